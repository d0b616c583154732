"""The image grids: thumbnails, heat maps and per-image scores of every cell."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from benchbase.records import Stage
from benchbase.report.data import CellView, RunData, fmt, per_image_scores, read_image, score_text
from benchbase.report.html import esc, href

THUMB_SIZE = 128  # px, longest side: a 4x4 grid of a cell reads well and weighs ~5 KB per image
MAX_SAMPLES = 8  # generated images shown per prompt (all are linked from the folder link)


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images; identical images count as 100 dB (as the psnr metric)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255.0**2
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(1.0 / mse))


def linf_levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class Thumbs:
    """Writes small JPEG thumbnails and PNG heat maps into ``out/thumbs``, once per source."""

    def __init__(self, out_dir: Path, size: int = THUMB_SIZE):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / "thumbs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.written: set[str] = set()

    def _name(self, tag: str, suffix: str) -> str:
        return hashlib.sha1(tag.encode()).hexdigest()[:20] + suffix

    def _resize(self, img: Image.Image, resample) -> Image.Image:
        w, h = img.size
        scale = self.size / max(w, h)
        if scale >= 1 and resample != Image.NEAREST:
            return img
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)

    def image(self, array: np.ndarray, tag: str) -> str:
        """A JPEG thumbnail (quality 90: the heat map, not the thumbnail, shows the
        perturbation); returns its path relative to the report folder."""
        name = self._name(tag, ".jpg")
        if name not in self.written:
            img = self._resize(Image.fromarray(array), Image.LANCZOS)
            img.save(self.folder / name, "JPEG", quality=90)
            self.written.add(name)
        return f"thumbs/{name}"

    def heat(self, a: np.ndarray, b: np.ndarray, scale: float, tag: str) -> str:
        """|a − b| (max over channels, in 8-bit levels) / scale through the magma colour map,
        enlarged with nearest neighbours so single-pixel structure stays visible."""
        from matplotlib import colormaps

        name = self._name(f"heat|{scale}|{tag}", ".png")
        if name not in self.written:
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1).astype(np.float64)
            rgba = colormaps["magma"](np.clip(diff / max(scale, 1e-9), 0, 1))
            img = Image.fromarray((rgba[..., :3] * 255 + 0.5).astype(np.uint8))
            if max(img.size) != self.size:
                img = self._resize(img, Image.NEAREST)
            img.save(self.folder / name, "PNG", optimize=True)
            self.written.add(name)
        return f"thumbs/{name}"

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def figure(thumb: str, link: str | None, caption: str, title: str, kind: str = "") -> str:
    img = f'<img src="{esc(thumb)}" alt="{esc(caption)}" title="{esc(title)}" loading="lazy">'
    if link:
        img = f'<a href="{esc(link)}">{img}</a>'
    return f'<figure class="img {kind}">{img}<figcaption>{esc(caption)}</figcaption></figure>'


def row(label: str, items: Iterable[str], note: str = "") -> str:
    body = "".join(items) or f'<span class="status">{esc(note or "none")}</span>'
    return f'<div class="row"><div class="rowlabel">{esc(label)}</div><div class="grid">{body}</div></div>'


def _heat_scale(run: RunData, cell: CellView) -> float:
    """The attack's budget ε in levels (16 when it has none): the heat map's full scale."""
    meta = run.meta(Stage.PROTECT, cell.keys.get("protect"))
    eps = meta.info.get("eps_levels") if meta else None
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else 16.0


MAX_CELLS = 200  # cells with image grids; a larger grid (the full protocol: 9,600) gets a note instead


def gallery_section(run: RunData, out_dir: Path, thumbs: Thumbs, max_samples: int = MAX_SAMPLES,
                    max_cells: int = MAX_CELLS) -> str:
    parts = ['<h2 id="images">Images</h2>',
             f"<p>Thumbnails ({thumbs.size} px, JPEG) link to the original PNGs. Heat maps: per-pixel "
             "|protected − clean| (max over RGB, in 8-bit levels) divided by the attack's budget ε "
             "(16 levels when it has none), magma colour map from 0 (black) to ε (yellow); for purified "
             "images |purified − clean| on the same scale. Scores under each image (and on hover): PSNR (dB) "
             "and L∞ (levels) against its clean image, computed here, then the per-image values the run's "
             "metrics recorded.</p>"]
    by_identity: dict[str, list[CellView]] = defaultdict(list)
    shown = run.cells[:max_cells]
    for cell in shown:
        by_identity[cell.identity].append(cell)
    for n_id, (identity, cells) in enumerate(by_identity.items()):
        parts.append(f'<details class="identity" {"open" if n_id == 0 else ""}><summary>identity '
                     f'{esc(identity)} ({len(cells)} cells)</summary>')
        clean = run.clean(cells[0])
        clean_by_stem: dict[str, np.ndarray] = {}
        if isinstance(clean, str):
            parts.append(f'<p class="warn">{esc(clean)}</p>')
        else:
            arrays, stems = clean
            clean_by_stem = dict(zip(stems, arrays))
            scores = per_image_scores([r for c in cells for r in c.records]).get("clean", {})
            folder = run.path(Stage.CLEAN, cells[0].keys.get("clean"))
            items = [figure(thumbs.image(a, f"clean|{identity}|{s}"), href(folder / "images" / f"{s}.png", out_dir),
                            f"{s}\n{score_text(scores, i)}", f"clean {s} {score_text(scores, i)}")
                     for i, (a, s) in enumerate(zip(arrays, stems))]
            parts.append(row("clean set_B", items))
        seen_attack: set = set()
        for cell in cells:
            parts.append(_cell_html(run, cell, out_dir, thumbs, clean_by_stem, max_samples,
                                    show_protected=(cell.seed, cell.attack) not in seen_attack))
            seen_attack.add((cell.seed, cell.attack))
        parts.append("</details>")
    if len(shown) < len(run.cells):
        # tens of thousands of thumbnails take minutes to write and no browser shows them well
        parts.append(f'<p class="status">Image grids of the first {len(shown)} of {len(run.cells)} cells '
                     f'(identities in run order); <code>benchbase report --max-cells N</code> shows more.</p>')
    return "\n".join(parts)


def _images_row(label: str, folder: Path | None, kind: str, out_dir: Path, thumbs: Thumbs,
                clean: dict[str, np.ndarray], scores: dict[str, list], scale: float) -> str:
    if folder is None or not (folder / "images").is_dir():
        return row(label, [], f"{kind} stage folder not found")
    files = sorted((folder / "images").glob("*.png"))
    items, heats = [], []
    for i, path in enumerate(files):
        arr = read_image(path)
        base = clean.get(path.stem)
        extra = {}
        if base is not None and base.shape == arr.shape:
            extra = {"PSNR": image_psnr(arr, base), "L∞": linf_levels(arr, base)}
        if extra and extra["L∞"] > 0:  # an all-black map says nothing the L∞ 0 caption does not
            heats.append(figure(thumbs.heat(arr, base, scale, str(path)), href(path, out_dir),
                                f"|{kind} − clean| / {scale:g}", f"heat map of {path.name}", "heat"))
        text = score_text(scores, i, extra)
        items.append(figure(thumbs.image(arr, str(path)), href(path, out_dir), f"{path.stem}: {text}",
                            f"{kind} {path.name} — {text}"))
    out = row(label, items)
    if heats:
        out += row(f"{label}: heat map", heats)
    return out


def _cell_html(run: RunData, cell: CellView, out_dir: Path, thumbs: Thumbs, clean: dict[str, np.ndarray],
               max_samples: int, show_protected: bool) -> str:
    keys = cell.keys
    protect_meta = run.meta(Stage.PROTECT, keys.get("protect"))
    scale = _heat_scale(run, cell)
    scores = per_image_scores(cell.records)
    parts = [f'<details class="cell" open><summary>{esc(cell.label)} (seed {cell.seed})</summary>']
    summary = []
    for rec in cell.records:
        value = fmt(rec.value) if rec.status == "ok" else rec.status
        summary.append(f'<span title="{esc(rec.error or "")}"><code>{esc(rec.metric)}</code> {esc(value)}</span>')
    parts.append("<p>" + " · ".join(summary) + "</p>")
    if protect_meta:
        info = protect_meta.info
        parts.append(f"<p>protect: ε {esc(info.get('eps_levels'))} levels, measured L∞ {esc(info.get('linf_levels'))}, "
                     f"L2 {esc(fmt(info.get('l2_levels')))} levels, {esc(fmt(protect_meta.seconds))} s</p>")
    if show_protected:
        parts.append(_images_row(f"protected ({cell.attack})", run.path(Stage.PROTECT, keys.get("protect")),
                                 "protected", out_dir, thumbs, clean, scores.get("protected", {}), scale))
    else:
        parts.append(f'<p class="status">protected images of {esc(cell.attack)}: shown above (one protection '
                     'serves every purifier).</p>')
    if cell.purifier == "none":  # the purify stage of 'none' holds the protected images again
        parts.append('<p class="status">no purifier: the personalizer trained on the protected images.</p>')
    else:
        parts.append(_images_row(f"purified ({cell.purifier})", run.path(Stage.PURIFY, keys.get("purify")),
                                 "purified", out_dir, thumbs, clean, scores.get("purified", {}), scale))
    gen = run.path(Stage.GENERATE, keys.get("generate"))
    if gen is None or not (gen / "prompts.json").is_file():
        parts.append(row("generated", [], "generate stage folder not found"))
    else:
        index = json.loads((gen / "prompts.json").read_text())
        for prompt, sub in index.items():
            files = sorted((gen / sub).glob("*.png"))
            prompt_scores = scores["generated"].get(prompt, {})
            items = []
            for i, path in enumerate(files[:max_samples]):
                text = score_text(prompt_scores, i)
                items.append(figure(thumbs.image(read_image(path), str(path)), href(path, out_dir),
                                    f"{path.stem}: {text}" if text else path.stem,
                                    f"{prompt} — {path.name} {text}"))
            more = (f' <a href="{esc(href(gen / sub, out_dir))}">all {len(files)}</a>'
                    if len(files) > max_samples else "")
            per_prompt = [f"{r.metric} {fmt(r.per_prompt.get(prompt))}" for r in cell.records if prompt in r.per_prompt]
            label = f"“{prompt}”" + (f" ({'; '.join(per_prompt)})" if per_prompt else "")
            parts.append(row(label, items) + more)
    parts.append("</details>")
    return "\n".join(parts)
