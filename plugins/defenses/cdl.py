"""Contrastive Decoupling Learning (CDL), the training-time half of DiffShortcut
(Liu et al., "Investigating and Defending Shortcut Learning in Personalized Diffusion
Models", arXiv 2406.18944), as released in ``diffshortcut/train_dreambooth.py``
(DiffShortcut, Liu et al., arXiv 2406.18944).

CDL changes prompts only; the released code adds no loss term:

- training, instance prompt: ``instance + ", " + phrase``
  ("a photo of sks person, bhj noisy pattern"): the noisy images bind to the noise token V_N*;
- training, class prompt: ``class + ", without " + phrase``
  ("a photo of person, without bhj noisy pattern"): clean prior images bind to its absence.
  The class *images* stay the base model's samples of the plain class prompt (the personalizer
  generates them from the undefended prompt);
- generation: every prompt gets ``", without " + phrase``;
- optional negative prompt "noisy, lowres, artifact, pattern" (``--outputNeg True``).

Released-code switches and their parameters here: ``--inputNegTok`` → ``train_noise_token``,
``--inputNegTok_Str`` → ``noise_phrase``, ``--outputNeg`` → ``negative_prompt``.

Quirk: the released ``infer()`` appends ", without <phrase>" to every prompt even when
``--inputNegTok False``, so the code's own "no CDL" baselines carry the suffix. This suite's
``none`` defense never appends it, and ``cdl`` with ``train_noise_token = false`` appends it
only when ``paper_quirks = true`` — that combination reproduces the released baseline.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from benchbase.components import Defense, Params, Prompts

NOISE_PHRASE = "bhj noisy pattern"
NEGATIVE_PROMPT = "noisy, lowres, artifact, pattern"


class CDL(Defense):
    """DiffShortcut CDL: noise-token prompt pairing at training time, ", without <phrase>" at
    generation time (defaults: phrase "bhj noisy pattern", negative prompt off)."""

    class Params(Params):
        #: the noise identifier phrase V_N* (released default; the code's ``noise_prompt``
        #: environment variable override is not read: set this parameter instead)
        noise_phrase: str = Field(NOISE_PHRASE, min_length=1)
        #: ``--inputNegTok``: the training-time prompt pairing (False = CDL's inference side only)
        train_noise_token: bool = True
        #: ``--outputNeg``: generate with the negative prompt ``negative_prompt_text``
        negative_prompt: bool = False
        negative_prompt_text: str = NEGATIVE_PROMPT
        #: reproduce the released code: the generation suffix is appended even when
        #: ``train_noise_token`` is off (the code's baselines)
        paper_quirks: bool = False

    @property
    def _suffix_on(self) -> bool:
        return self.params.train_noise_token or self.params.paper_quirks

    def training_prompts(self, prompts: Prompts) -> Prompts:
        if not self.params.train_noise_token:
            return prompts
        phrase = self.params.noise_phrase
        return replace(prompts, instance=f"{prompts.instance}, {phrase}",
                       class_=f"{prompts.class_}, without {phrase}")

    def generation_prompt(self, prompt: str) -> str:
        return f"{prompt}, without {self.params.noise_phrase}" if self._suffix_on else prompt

    def negative_prompt(self, negative: str) -> str:
        if not self.params.negative_prompt:
            return negative
        # the released code's negative prompt is "" or the phrase; a suite-level negative
        # prompt is kept in front rather than silently dropped
        return f"{negative}, {self.params.negative_prompt_text}" if negative else self.params.negative_prompt_text
