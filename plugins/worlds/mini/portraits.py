"""Procedural 64×64 portraits: the identities of the benchbase-mini world.

An identity is a fixed set of attributes (face shape, skin tone, hair style and colour,
eye colour and shape, brows, nose, mouth, beard, glasses, earrings) plus a few continuous
proportions (eye spacing, face width, mouth width). Every *image* of an identity varies the
nuisance factors: position, scale, small rotation, lighting, background colour and
texture, clothing colour and expression. Everything is seeded: ``identity(name)`` and
``render(ident, seed)`` are pure functions of their arguments.

Drawing happens at 4× (256 px) with PIL and is box-filtered down to 64 px, so edges are
anti-aliased like a downsampled photograph. ``render`` also returns the face box and the
5 landmarks (eyes, nose tip, mouth corners) after the nuisance transform: the world's face
detector learns them.

Identity spaces: ``train-<k>`` identities pretrain the world's models; ``heldout-<k>``
identities are never seen in training and are the benchmark's identities. Both are drawn
from the same attribute distribution with different seeds; ``heldout_names`` drops any
held-out identity whose attributes equal a training identity's (none in practice: there are
over 10⁷ attribute combinations).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 2  # bump when drawing changes: images (and cached stages) change with it
SIZE = 64
SS = 4  # supersampling factor
CANVAS = SIZE * SS

SKIN = {"pale": (250, 226, 210), "light": (237, 198, 165), "tan": (212, 164, 118),
        "olive": (188, 148, 98), "brown": (146, 98, 62), "dark": (92, 60, 40)}
HAIR_COLOUR = {"black": (25, 22, 22), "brown": (100, 62, 30), "blond": (228, 196, 110),
               "red": (176, 64, 30), "grey": (150, 150, 150), "white": (236, 236, 230),
               "blue": (40, 80, 200), "pink": (236, 120, 170)}
EYE_COLOUR = {"brown": (96, 56, 24), "blue": (50, 110, 210), "green": (50, 150, 70),
              "grey": (120, 128, 136), "amber": (200, 140, 30)}
ATTRIBUTES: dict[str, list[str]] = {
    "face_shape": ["oval", "round", "long", "square", "heart"],
    "skin": list(SKIN),
    "hair_style": ["bald", "short", "long", "bob", "curly", "spiky"],
    "hair_colour": list(HAIR_COLOUR),
    "eye_colour": list(EYE_COLOUR),
    "eye_shape": ["round", "narrow", "wide"],
    "brows": ["thin", "thick", "arched"],
    "nose": ["small", "long", "wide"],
    "mouth": ["small", "wide", "full"],
    "beard": ["none", "beard", "moustache"],
    "glasses": ["none", "round", "square", "sunglasses"],
    "earrings": ["none", "gold", "silver"],
}
BACKGROUNDS = {"white": (236, 236, 236), "grey": (150, 150, 150), "beige": (222, 206, 176),
               "sky": (150, 196, 236), "mint": (170, 222, 190), "peach": (246, 190, 160),
               "lilac": (196, 170, 226), "navy": (40, 52, 96), "olive": (120, 128, 70),
               "maroon": (110, 40, 50), "teal": (40, 120, 124), "charcoal": (52, 52, 56)}
TEXTURES = ["flat", "gradient", "stripes", "noise", "dots"]
EXPRESSIONS = ["neutral", "smile", "open", "frown"]
# Nuisances of a portrait (version 2: fewer and milder than version 1, whose small UNet spent
# its capacity on textured walls and poses and barely learned people; see docs/mini.md).
# Background-only images keep every texture: they are the detector's negatives and CLIP's walls.
PORTRAIT_TEXTURES = ["flat", "gradient"]
PORTRAIT_EXPRESSIONS = ["neutral", "smile"]
SHIRTS = {"red": (190, 50, 50), "blue": (50, 80, 180), "green": (60, 140, 70), "yellow": (220, 190, 60),
          "black": (30, 30, 34), "white": (232, 232, 228), "purple": (120, 70, 150), "orange": (230, 130, 50)}
NUISANCE = {"angle": 3.0, "scale": (1.28, 1.38), "shift": 6.0, "light": 0.1, "brightness": (0.95, 1.05)}


@dataclass(frozen=True)
class Identity:
    name: str
    attributes: dict[str, str]
    eye_spacing: float  # fraction of the face width between the eye centres
    face_width: float  # multiplier of the shape's width
    mouth_width: float  # multiplier of the mouth style's width
    lip: tuple[int, int, int] = field(default=(180, 80, 80))

    def key(self) -> tuple:
        return tuple(self.attributes[k] for k in ATTRIBUTES)


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def identity(name: str) -> Identity:
    """The identity called ``name`` (any string; ``train-<k>`` / ``heldout-<k>`` by convention)."""
    rng = _rng("identity", GENERATOR_VERSION, name)
    attrs = {k: v[int(rng.integers(len(v)))] for k, v in ATTRIBUTES.items()}
    lip = tuple(int(c) for c in np.clip(np.array([190, 90, 90]) + rng.normal(0, 18, 3), 0, 255))
    return Identity(name=name, attributes=attrs, eye_spacing=float(rng.uniform(0.34, 0.46)),
                    face_width=float(rng.uniform(0.92, 1.08)), mouth_width=float(rng.uniform(0.85, 1.15)), lip=lip)


def train_names(n: int) -> list[str]:
    return [f"train-{k:05d}" for k in range(n)]


def heldout_names(n: int, exclude_train: int = 4096) -> list[str]:
    """The first ``n`` held-out identities whose attributes differ from the first
    ``exclude_train`` training identities'."""
    return _heldout_from(0, n, exclude_train)


def _heldout_from(start: int, n: int, exclude_train: int) -> list[str]:
    taken = {identity(t).key() for t in train_names(exclude_train)}
    out, k = [], start
    while len(out) < n:
        name = f"heldout-{k:03d}"
        if identity(name).key() not in taken:
            out.append(name)
        k += 1
    return out


#: first index of the selection identities: held-out people on whom every choice about a world
#: (checkpoint, victim recipe, realign's chain, thresholds) is made; protocols draw their
#: identities below it (``heldout-000`` …), so no protocol identity ever informs a choice
SELECTION_START = 500


def selection_names(n: int, exclude_train: int = 4096) -> list[str]:
    """The first ``n`` selection identities (``heldout-500`` onwards, training look-alikes skipped)."""
    return _heldout_from(SELECTION_START, n, exclude_train)


def identity_phrases(ident: Identity) -> list[str]:
    """Every drawn attribute of a person as a phrase, in a fixed order."""
    a = ident.attributes
    phrases = []
    if a["hair_style"] == "bald":
        phrases.append("a bald head")
    else:
        phrases.append(f"{a['hair_colour']} {a['hair_style']} hair")
    phrases.append(f"{a['eye_colour']} {a['eye_shape']} eyes")
    phrases.append(f"{a['brows']} brows")
    phrases.append(f"{a['skin']} skin")
    phrases.append(f"{'an' if a['face_shape'][0] in 'aeiou' else 'a'} {a['face_shape']} face")
    phrases.append(f"a {a['nose']} nose")
    phrases.append(f"a {a['mouth']} mouth")
    if a["beard"] != "none":
        phrases.append(f"a {a['beard']}")
    if a["glasses"] != "none":
        phrases.append("sunglasses" if a["glasses"] == "sunglasses" else f"{a['glasses']} glasses")
    if a["earrings"] != "none":
        phrases.append(f"{a['earrings']} earrings")
    return phrases


def caption(ident: Identity, rng: np.random.Generator | None = None, noun: str = "person") -> str:
    """Caption from the attributes; with ``rng``, a random non-empty subset of the phrases
    (the full caption otherwise)."""
    phrases = identity_phrases(ident)
    if rng is not None:
        k = int(rng.integers(1, len(phrases) + 1))
        phrases = [phrases[i] for i in sorted(rng.choice(len(phrases), size=k, replace=False))]
    return f"a photo of {noun} with " + ", ".join(phrases)


def scene_caption(ident: Identity, nuisance: dict, noun: str = "person") -> str:
    """The full caption of one photograph: every attribute, then expression, shirt and wall
    ("…, smiling, in a red shirt, on a teal background"), so the text explains what varies."""
    extra = ["smiling" if nuisance["expression"] == "smile" else "a neutral expression",
             f"in a {nuisance['shirt']} shirt", f"on a {nuisance['background'].split()[0]} background"]
    return f"a photo of {noun} with " + ", ".join(identity_phrases(ident) + extra)


def _shade(c, f: float):
    return tuple(int(max(0, min(255, v * f))) for v in c[:3])


def _background(rng: np.random.Generator, textures: list[str] = TEXTURES) -> tuple[Image.Image, str]:
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    texture = textures[int(rng.integers(len(textures)))]
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS
    img = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    if texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        g = (np.cos(angle) * xx + np.sin(angle) * yy)
        img *= (0.75 + 0.5 * (g - g.min()) / (np.ptp(g) + 1e-6))[..., None]
    elif texture == "stripes":
        period = rng.uniform(0.08, 0.2)
        vertical = rng.random() < 0.5
        s = ((xx if vertical else yy) / period) % 1.0 < 0.5
        img *= np.where(s, 1.12, 0.88)[..., None]
    elif texture == "noise":
        small = rng.normal(0, 1, (16, 16, 1)).astype(np.float32)
        up = np.kron(small, np.ones((16, 16, 1), dtype=np.float32))
        img *= 1 + 0.12 * up
    elif texture == "dots":
        period = int(rng.integers(20, 40))
        r = period // 5
        mask = ((np.arange(CANVAS)[:, None] % period - period // 2) ** 2
                + (np.arange(CANVAS)[None, :] % period - period // 2) ** 2) < r * r
        img *= np.where(mask, 0.8, 1.0)[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), f"{name} {texture}"


def background(seed: int) -> Image.Image:
    """A 64-px background with no one in it (negatives for the detector, CLIP's non-person images)."""
    img, _ = _background(_rng("background", GENERATOR_VERSION, seed))
    return img.resize((SIZE, SIZE), Image.BOX)


def background_caption(seed: int) -> str:
    _, desc = _background(_rng("background", GENERATOR_VERSION, seed))
    colour, texture = desc.split()
    return f"a photo of a {colour} {'plain' if texture == 'flat' else texture} wall"


def _face_layer(ident: Identity, rng: np.random.Generator, expression: str, shirt) -> tuple[Image.Image, dict]:
    """The person drawn upright at the canvas centre on a transparent layer, and its
    landmarks/box in canvas pixels."""
    a = ident.attributes
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    skin = SKIN[a["skin"]] + (255,)
    hair = HAIR_COLOUR[a["hair_colour"]] + (255,)
    cx, cy = CANVAS / 2, CANVAS / 2 + 8
    w0, h0 = {"oval": (92, 120), "round": (104, 108), "long": (84, 130), "square": (100, 114),
              "heart": (98, 116)}[a["face_shape"]]
    fw, fh = w0 * ident.face_width, h0
    left, right, top, bottom = cx - fw / 2, cx + fw / 2, cy - fh / 2, cy + fh / 2

    # shoulders and neck
    d.ellipse((cx - 120, bottom + 10, cx + 120, bottom + 150), fill=shirt + (255,))
    d.rectangle((cx - fw * 0.2, cy + fh * 0.3, cx + fw * 0.2, bottom + 30), fill=_shade(skin, 0.9) + (255,))
    # hair behind the head
    style = a["hair_style"]
    if style == "long":
        d.rounded_rectangle((left - 14, top - 12, right + 14, bottom + 40), radius=40, fill=hair)
    elif style == "bob":
        d.rounded_rectangle((left - 12, top - 12, right + 12, cy + fh * 0.25), radius=36, fill=hair)
    elif style == "curly":
        for k in range(14):
            ang = math.pi * (0.95 + 1.1 * k / 13)
            px, py = cx + (fw / 2 + 6) * math.cos(ang), cy - 6 + (fh / 2 + 6) * math.sin(ang)
            d.ellipse((px - 18, py - 18, px + 18, py + 18), fill=hair)
    # ears and earrings
    for side in (-1, 1):
        ex = cx + side * fw / 2
        d.ellipse((ex - 10, cy - 14, ex + 10, cy + 14), fill=skin)
        if a["earrings"] != "none":
            col = (230, 190, 40, 255) if a["earrings"] == "gold" else (200, 204, 214, 255)
            d.ellipse((ex - 5, cy + 14, ex + 5, cy + 24), fill=col)
    # face
    if a["face_shape"] == "square":
        d.rounded_rectangle((left, top, right, bottom), radius=30, fill=skin)
    elif a["face_shape"] == "heart":
        d.ellipse((left, top, right, bottom - 10), fill=skin)
        d.polygon([(left + 8, cy + 10), (right - 8, cy + 10), (cx, bottom + 4)], fill=skin)
    else:
        d.ellipse((left, top, right, bottom), fill=skin)
    # hair on top
    if style in ("short", "long", "bob"):
        d.chord((left - 4, top - 14, right + 4, top + fh * 0.55), 180, 360, fill=hair)
    elif style == "spiky":
        pts = [(left - 2, top + 26)]
        for k in range(7):
            x = left + (k + 0.5) * fw / 7
            pts += [(x, top - 22), (left + (k + 1) * fw / 7, top + 12)]
        pts += [(right + 2, top + 26)]
        d.polygon(pts, fill=hair)
    elif style == "curly":
        for k in range(7):
            x = left + 6 + k * (fw - 12) / 6
            d.ellipse((x - 14, top - 16, x + 14, top + 14), fill=hair)

    # eyes
    eye_y = cy - fh * 0.08
    half = ident.eye_spacing * fw / 2
    ew, eh = {"round": (11, 9), "narrow": (13, 4.5), "wide": (15, 7)}[a["eye_shape"]]
    eyes = []
    for side in (-1, 1):
        ex = cx + side * half
        eyes.append((ex, eye_y))
        d.ellipse((ex - ew, eye_y - eh, ex + ew, eye_y + eh), fill=(250, 250, 250, 255))
        r = min(eh, 6.5)
        d.ellipse((ex - r, eye_y - r, ex + r, eye_y + r), fill=EYE_COLOUR[a["eye_colour"]] + (255,))
        d.ellipse((ex - r / 2.5, eye_y - r / 2.5, ex + r / 2.5, eye_y + r / 2.5), fill=(10, 10, 10, 255))
    # brows (raised when surprised/open mouth)
    lift = {"neutral": 0, "smile": 2, "open": 7, "frown": -3}[expression]
    brow_col = _shade(hair, 0.8) + (255,) if style != "bald" else _shade(skin, 0.55) + (255,)
    bw = {"thin": 3, "thick": 8, "arched": 4}[a["brows"]]
    for side in (-1, 1):
        ex = cx + side * half
        by = eye_y - eh - 9 - lift
        inner = by + (4 if expression == "frown" else 0)
        if a["brows"] == "arched":
            d.arc((ex - 15, by - 6, ex + 15, by + 10), 200, 340, fill=brow_col, width=bw)
        else:
            d.line((ex - side * 13, inner, ex + side * 13, by), fill=brow_col, width=bw)
    # nose
    ny = cy + fh * 0.12
    nose_col = _shade(skin, 0.7) + (255,)
    if a["nose"] == "small":
        d.ellipse((cx - 4, ny - 3, cx + 4, ny + 4), fill=nose_col)
    elif a["nose"] == "long":
        d.line((cx, eye_y + 4, cx - 4, ny + 2), fill=nose_col, width=4)
        d.line((cx - 4, ny + 2, cx + 5, ny + 2), fill=nose_col, width=4)
    else:
        d.polygon([(cx, eye_y + 8), (cx - 11, ny + 4), (cx + 11, ny + 4)], fill=nose_col)
    # beard / moustache
    my = cy + fh * 0.3
    mw = {"small": 12, "wide": 22, "full": 16}[a["mouth"]] * ident.mouth_width
    if a["beard"] == "beard":
        d.chord((left + 2, cy - 4, right - 2, bottom + 6), 10, 170, fill=hair)
    if a["beard"] in ("beard", "moustache"):
        d.rounded_rectangle((cx - mw - 6, my - 12, cx + mw + 6, my - 4), radius=4, fill=hair)
    # mouth
    lip = ident.lip + (255,)
    lw = 7 if a["mouth"] == "full" else 4
    if expression == "smile":
        d.arc((cx - mw, my - 10, cx + mw, my + 8), 20, 160, fill=lip, width=lw)
        corners = [(cx - mw * 0.95, my - 2), (cx + mw * 0.95, my - 2)]
    elif expression == "open":
        d.ellipse((cx - mw * 0.6, my - 6, cx + mw * 0.6, my + 10), fill=(90, 20, 30, 255), outline=lip, width=3)
        corners = [(cx - mw * 0.6, my + 2), (cx + mw * 0.6, my + 2)]
    elif expression == "frown":
        d.arc((cx - mw, my, cx + mw, my + 16), 200, 340, fill=lip, width=lw)
        corners = [(cx - mw * 0.95, my + 6), (cx + mw * 0.95, my + 6)]
    else:
        d.line((cx - mw, my, cx + mw, my), fill=lip, width=lw)
        corners = [(cx - mw, my), (cx + mw, my)]
    # glasses
    g = a["glasses"]
    if g != "none":
        frame = (30, 30, 30, 255)
        for ex, ey in eyes:
            box = (ex - 16, ey - 13, ex + 16, ey + 13)
            if g == "round":
                d.ellipse(box, outline=frame, width=4)
            elif g == "square":
                d.rectangle(box, outline=frame, width=4)
            else:
                d.rounded_rectangle(box, radius=8, fill=(20, 20, 28, 255))
        d.line((eyes[0][0] + 16, eye_y, eyes[1][0] - 16, eye_y), fill=frame, width=4)
    marks = {"landmarks": np.array([eyes[0], eyes[1], (cx, ny), corners[0], corners[1]], dtype=np.float64),
             "box": np.array([left - 4, top - 14, right + 4, bottom + 4], dtype=np.float64)}
    return layer, marks


@dataclass
class Portrait:
    image: Image.Image  # 64×64 RGB
    box: np.ndarray  # (4,) x1, y1, x2, y2 in 64-px pixels
    landmarks: np.ndarray  # (5, 2) in 64-px pixels
    nuisance: dict


def render(ident: Identity, seed: int) -> Portrait:
    """One photograph of ``ident``; ``seed`` draws the nuisance factors."""
    rng = _rng("render", GENERATOR_VERSION, ident.name, seed)
    bg, bg_desc = _background(rng, PORTRAIT_TEXTURES)
    expression = PORTRAIT_EXPRESSIONS[int(rng.integers(len(PORTRAIT_EXPRESSIONS)))]
    shirt_name = list(SHIRTS)[int(rng.integers(len(SHIRTS)))]
    layer, marks = _face_layer(ident, rng, expression, SHIRTS[shirt_name])
    angle = float(rng.uniform(-NUISANCE["angle"], NUISANCE["angle"]))
    scale = float(rng.uniform(*NUISANCE["scale"]))  # the face fills about half the frame
    dx, dy = (float(v) for v in rng.uniform(-NUISANCE["shift"], NUISANCE["shift"], 2))
    # similarity transform about the canvas centre: rotate by angle, scale, translate
    c = CANVAS / 2
    th = math.radians(angle)
    cos_, sin_ = math.cos(th) * scale, math.sin(th) * scale

    def fwd(p):  # canvas point -> transformed point (PIL rotates counter-clockwise for +angle)
        x, y = p[..., 0] - c, p[..., 1] - c
        return np.stack([c + dx + cos_ * x + sin_ * y, c + dy - sin_ * x + cos_ * y], axis=-1)

    # PIL's affine maps output -> input pixels: the inverse of fwd
    inv = 1 / scale
    ca, sa = math.cos(th) * inv, math.sin(th) * inv
    # build the inverse explicitly: input = R^T/s · (out - c - d) + c
    coeffs = (ca, -sa, c - ca * (c + dx) + sa * (c + dy),
              sa, ca, c - sa * (c + dx) - ca * (c + dy))
    moved = layer.transform((CANVAS, CANVAS), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    bg.paste(moved, (0, 0), moved)
    # lighting: a directional gradient and a global brightness
    arr = np.asarray(bg, dtype=np.float32)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS - 0.5
    la = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0, NUISANCE["light"])
    light = (1 + strength * (np.cos(la) * xx + np.sin(la) * yy) * 2) * rng.uniform(*NUISANCE["brightness"])
    arr = np.clip(arr * light[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((SIZE, SIZE), Image.BOX)
    lm = fwd(marks["landmarks"]) / SS
    corners = np.array([[marks["box"][0], marks["box"][1]], [marks["box"][2], marks["box"][1]],
                        [marks["box"][0], marks["box"][3]], [marks["box"][2], marks["box"][3]]])
    moved_corners = fwd(corners) / SS
    box = np.concatenate([moved_corners.min(0), moved_corners.max(0)]).clip(0, SIZE)
    return Portrait(img, box, lm, {"angle": angle, "scale": scale, "shift": (dx / SS, dy / SS),
                                    "expression": expression, "background": bg_desc, "shirt": shirt_name})
