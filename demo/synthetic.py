"""Synthetic visible-infrared person re-id data, written in the real SYSU-MM01, RegDB and LLCM layouts.

No paper: SYSU-MM01, RegDB and LLCM need licences, so tests and the default demo render person figures
here and read them back with the real loaders (docs/mult.md §1.1 SYSU-MM01 on disk, §1.2 RegDB on
disk, §1.3 every file decodes to 3 channels; data/llcm.py for the LLCM layout).

Identity lives in both modalities in body shape (height, shoulder and hip width, head size, leg
length), cut (sleeves, trousers/shorts/skirt, long hair), garment pattern (solid, stripes in three
directions, checks, dots) and its period, and accessories (hat, bag or backpack, side); in visible
only in garment hue and saturation. Infrared stands for the near-infrared of SYSU-MM01's cameras
(RegDB's thermal camera is not modelled): a garment's infrared level is NIR_FROM_LUMA = 0.8 its
visible luminance plus 0.2 a reflectance drawn independently of its colour, so luminance predicts
infrared intensity only in part (correlation about 0.93; the modality gap stays real: hue and
saturation vanish, and camera response, background and blur differ). With infrared independent of
colour (NIR_FROM_LUMA = 0, this module's format 1) nothing but shape and pattern links the
modalities, and the CPU demo could not show cross-modality learning (README, "Demo results").
Nuisance: per camera (mirrored view, shear, shift, scale, background, gain and colour cast, infrared
response and blur), per image (position, scale, legs, arms, light, background, noise).

Infrared is rendered as one intensity channel and saved as an RGB JPEG with three equal channels:
libjpeg's fixed-point YCbCr weights sum exactly, so a grey pixel has chroma exactly 128 and the
decoded channels are bit-identical (tested). Every draw comes from np.random.default_rng keyed by
(seed, pid), (seed, camera) or (seed, pid, camera, image): more ids or images leave the other
pictures unchanged, and the same arguments give the same bytes.
"""
import argparse
import colorsys
import inspect
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.common import IR, VIS
from data.datasets import SYNTHETIC_META

META = SYNTHETIC_META            # written last into a rendered folder; data.datasets reads it back
FORMAT_VERSION = 2            # 2: infrared follows visible luminance in part (NIR_FROM_LUMA)
LUMA = np.array([0.299, 0.587, 0.114])   # ITU-R BT.601, as PIL's convert("L")
NIR_FROM_LUMA = 0.8
SYSU_CAMS = {1: VIS, 2: VIS, 3: IR, 4: VIS, 5: VIS, 6: IR}   # as in the real SYSU-MM01
MISSING_RATE = 0.10           # fraction of (id, camera) folders left out, like real SYSU-MM01
REGDB_IMAGES, REGDB_TRIALS = 10, 10
LLCM_CAMS = {VIS: (1, 2, 3, 4, 5, 6, 7, 8, 9), IR: (1, 2, 4, 5, 6, 7, 8, 9)}   # no infrared camera 3
LLCM_FOLDERS = {VIS: "vis", IR: "nir"}
LOW_LIGHT = 0.6               # LLCM's visible cameras: gain x 0.6 and twice the pixel noise
JPEG = dict(quality=95, subsampling=0)   # 4:4:4 chroma keeps the thin colour stripes
IMAGE_NOTE = "JPEG quality 95, 4:4:4, RGB (infrared: 3 equal channels)"
_ID, _CAM, _VIEW, _SPLIT, _MISS, _REGDB, _LLCM = 1, 2, 3, 4, 5, 6, 7   # rng stream tags


def _rng(seed, *keys):
    return np.random.default_rng([seed, *keys])


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high or 'inf'}], got {value}")
    return int(value)


# ------------------------------------------------------------------ identities, cameras, views
def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _contrast(rng, base, low, high):
    """A second level that differs from `base` by U(0.25, 0.5), kept inside [low, high]."""
    d = rng.uniform(0.25, 0.5) * rng.choice([-1.0, 1.0])
    return base + d if low <= base + d <= high else base - d


def _infrared(rgb, reflectance):
    """Infrared level of a garment: luminance (mapped to [0.1, 0.9]) mixed with its reflectance."""
    return NIR_FROM_LUMA * (0.1 + 0.8 * float(rgb @ LUMA)) + (1 - NIR_FROM_LUMA) * reflectance


def _garment(rng, kind_probs):
    """Colours a, b as [r, g, b, ir] and a pattern; ir: luminance and independent reflectance."""
    h_a, s_a, v_a = rng.random(), rng.uniform(0.15, 1.0), rng.uniform(0.2, 0.95)
    v_b = _contrast(rng, v_a, 0.05, 1.0)
    ir_a = rng.uniform(0.1, 0.9)                  # reflectance: independent of hue and value
    ir_b = _contrast(rng, ir_a, 0.05, 1.0)
    rgb_a, rgb_b = _hsv(h_a, s_a, v_a), _hsv(rng.random(), rng.uniform(0.15, 1.0), v_b)
    a = np.append(rgb_a, _infrared(rgb_a, ir_a))
    b = np.append(rgb_b, _infrared(rgb_b, ir_b))
    return dict(a=a, b=b, kind=int(rng.choice(6, p=kind_probs)),
                period=float(np.exp(rng.uniform(np.log(0.065), np.log(0.14)))),
                phase=rng.random(2))


def draw_identity(seed, pid):
    """Appearance of identity `pid`; lengths in body heights (0 = top of head, 1 = feet)."""
    rng = _rng(seed, _ID, pid)
    shoulder = rng.uniform(0.09, 0.165)
    solid = lambda vis, ir: dict(a=np.append(vis, ir), b=np.append(vis, ir), kind=0)
    plain = [1.0, 0, 0, 0, 0, 0]
    return dict(
        height=rng.uniform(0.70, 0.94), head=rng.uniform(0.05, 0.08), shoulder=shoulder,
        hip=shoulder * rng.uniform(0.7, 1.0), hip_v=rng.uniform(0.45, 0.58),
        leg=rng.uniform(0.032, 0.05), arm=rng.uniform(0.02, 0.03),
        long_sleeves=bool(rng.random() < 0.5), long_hair=bool(rng.random() < 0.35),
        lower_cut=int(rng.choice(3, p=[0.5, 0.25, 0.25])),          # trousers, shorts, skirt
        skirt=rng.uniform(0.14, 0.26),
        upper=_garment(rng, [0.25, 0.2, 0.15, 0.1, 0.15, 0.15]),
        lower=_garment(rng, [0.35, 0.15, 0.2, 0.0, 0.3, 0.0]),
        skin=solid(_hsv(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95)),
                   rng.uniform(0.8, 0.95)),
        hair=solid(_hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.5)),
                   rng.uniform(0.25, 0.45)),
        shoes=solid(_hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.05, 0.6)),
                    rng.uniform(0.15, 0.35)),
        hat=_garment(rng, plain) if rng.random() < 0.3 else None,
        carry=int(rng.choice(3, p=[0.45, 0.3, 0.25])),               # none, bag, backpack
        carry_side=float(rng.choice([-1.0, 1.0])), bag=_garment(rng, plain))


def draw_camera(seed, key, modality):
    """Fixed properties of camera `key` (SYSU: 1..6; RegDB: 101 visible, 102 infrared)."""
    rng = _rng(seed, _CAM, key)
    cam = dict(modality=modality, mirror=float(rng.choice([-1.0, 1.0])),
               shear=rng.uniform(-0.08, 0.08), dx=rng.uniform(-0.05, 0.05),
               scale=rng.uniform(0.88, 1.04), foot=rng.uniform(0.94, 0.985))
    if modality == VIS:
        cam.update(top=rng.uniform(0.2, 0.9, 3), bottom=rng.uniform(0.2, 0.9, 3),
                   floor_at=rng.uniform(0.7, 0.9), floor=rng.uniform(0.15, 0.8, 3),
                   texture=int(rng.integers(3)), tex_amp=rng.uniform(0.05, 0.15),
                   tex_freq=rng.uniform(2.0, 6.0), blob=rng.uniform(0.03, 0.08),
                   phase=rng.random(), scene=rng.standard_normal((6, 3, 3)),
                   gain=rng.uniform(0.75, 1.15), cast=rng.uniform(0.85, 1.15, 3),
                   noise=rng.uniform(0.01, 0.025))
    else:
        cam.update(level=rng.uniform(0.05, 0.2), slope=rng.uniform(-0.1, 0.1),
                   blob=rng.uniform(0.04, 0.1), scene=rng.standard_normal((8, 4, 1)),
                   gain=rng.uniform(0.8, 1.1), offset=rng.uniform(0.0, 0.06),
                   gamma=rng.uniform(0.8, 1.25), blur=bool(rng.random() < 0.5),
                   noise=rng.uniform(0.015, 0.035))
    return cam


def draw_view(rng):
    """Per-image nuisance: position, scale, leg spread, arm swing, light, background shift."""
    return dict(dx=rng.uniform(-0.05, 0.05), dy=rng.uniform(-0.015, 0.015),
                scale=rng.uniform(0.94, 1.06), spread=rng.uniform(0.0, 0.13),
                swing=rng.uniform(-0.12, 0.12), light=rng.uniform(0.95, 1.05),
                phase=rng.uniform(-0.03, 0.03))


# ------------------------------------------------------------------ drawing (vectorised numpy)
def _soft(d, px):
    """Anti-aliased coverage from a signed distance d (> 0 inside) in body units."""
    return np.clip(d / px + 0.5, 0.0, 1.0)


def _box(u, v, u0, u1, v0, v1, px):
    u0, u1 = min(u0, u1), max(u0, u1)
    return _soft(np.minimum(np.minimum(u - u0, u1 - u), np.minimum(v - v0, v1 - v)), px)


def _trapezoid(u, v, v0, v1, w0, w1, px):
    """Symmetric about u = 0, half width w0 at v0 growing linearly to w1 at v1."""
    w = w0 + (w1 - w0) * np.clip((v - v0) / (v1 - v0), 0.0, 1.0)
    return _soft(np.minimum(w - np.abs(u), np.minimum(v - v0, v1 - v)), px)


def _ellipse(u, v, cu, cv, ru, rv, px):
    return _soft((1.0 - np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)) * min(ru, rv), px)


def _capsule(u, v, p0, p1, half_width, px):
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return _soft(half_width - np.hypot(u - p0[0] - t * du, v - p0[1] - t * dv), px)


def _material(m, u, v, px):
    """Colour [r, g, b, ir] of material m at (u, v): [4] if solid, else [h, W, 4]."""
    if m["kind"] == 0:
        return m["a"]
    p = m["period"]
    a, b = u / p + m["phase"][0], v / p + m["phase"][1]
    # square wave with one-pixel edges: sin(2 pi t) rises by 2 pi px / p per pixel near zero
    square = lambda t: np.clip(0.5 + np.sin(2 * np.pi * t) * p / (2 * np.pi * px), 0.0, 1.0)
    if m["kind"] == 1:                     # horizontal stripes
        w = square(b) + 0 * u
    elif m["kind"] == 2:                   # vertical stripes
        w = square(a) + 0 * v
    elif m["kind"] == 3:                   # diagonal stripes
        w = square((a + b) / math.sqrt(2))
    elif m["kind"] == 4:                   # checks: exclusive or of two square waves
        sa, sb = square(a), square(b)
        w = sa + sb - 2 * sa * sb
    else:                                  # dots on a square lattice
        w = _soft(0.3 * p - np.hypot(a % 1.0 - 0.5, b % 1.0 - 0.5) * p, px)
    return m["a"] + w[..., None] * (m["b"] - m["a"])


def _upsample(field, height, width):
    """Bilinear upsampling of a coarse [h, w, C] field to [H, W, C]."""
    def interp(n_out, n_in):               # [n_out, n_in] interpolation weights
        t = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.minimum(t.astype(int), n_in - 2)
        mat = np.zeros((n_out, n_in))
        mat[np.arange(n_out), i0], mat[np.arange(n_out), i0 + 1] = 1 - (t - i0), t - i0
        return mat
    rows = np.tensordot(interp(height, field.shape[0]), field, axes=1)     # [H, w, C]
    return np.tensordot(rows, interp(width, field.shape[1]), axes=([1], [1])).transpose(0, 2, 1)


def render_image(ident, camera, view, rng, height, width):
    """One picture of `ident` seen by `camera`: uint8 [H, W, 3] (infrared: 3 equal channels).

    `view` gives pose and position; `rng` the background texture and the pixel noise.
    """
    H, W, g = height, width, ident
    y, x = (np.arange(H) + 0.5)[:, None], (np.arange(W) + 0.5)[None, :]    # [H, 1], [1, W]
    hb = g["height"] * H * camera["scale"] * view["scale"]          # body height in pixels
    foot = H * (camera["foot"] + view["dy"])
    xc = W * (0.5 + camera["dx"] + view["dx"])
    u = camera["mirror"] * (x - xc - camera["shear"] * (foot - y)) / hb   # [H, W] body units
    v = (y - foot + hb) / hb                                         # [H, 1], 0 = top of head
    px = 1.0 / hb                                                    # one pixel in body units
    col, cov = np.zeros((H, W, 4)), np.zeros((H, W))   # premultiplied [r, g, b, ir], coverage

    def paint(alpha, m):                   # "over" compositing, on the rows alpha touches
        rows = np.flatnonzero(alpha.max(axis=1) > 0)
        if rows.size:
            r = slice(rows[0], rows[-1] + 1)
            col[r] -= alpha[r, :, None] * (col[r] - _material(m, u[r], v[r], px))
            cov[r] += alpha[r] * (1 - cov[r])

    hr, sh, hip, hip_v = g["head"], g["shoulder"], g["hip"], g["hip_v"]
    v_sh, v_ank, side = 2 * hr + 0.02, 0.965, g["carry_side"]
    if g["long_hair"]:
        paint(_ellipse(u, v, 0, 1.5 * hr, 1.05 * hr, 1.6 * hr, px), g["hair"])
    if g["carry"] == 2:                    # backpack, behind the torso
        paint(_box(u, v, side * 0.5 * sh, side * (sh + 0.04), v_sh + 0.02, hip_v - 0.03, px),
              g["bag"])
    for s in (-1.0, 1.0):                  # legs: skin, the lower garment, shoes
        p0 = (s * 0.5 * hip, hip_v)
        tilt = math.tan(view["spread"] * (0.5 + 0.5 * s) + 0.02)
        p1 = (s * (0.5 * hip + (v_ank - hip_v) * tilt), v_ank)
        leg = _capsule(u, v, p0, p1, g["leg"], px)
        paint(leg, g["skin"])
        if g["lower_cut"] < 2:             # trousers to the ankle, shorts to mid-thigh
            hem = v_ank - 0.02 if g["lower_cut"] == 0 else hip_v + 0.18
            paint(leg * _soft(hem - v, px), g["lower"])
        paint(_ellipse(u, v, p1[0] + s * 0.012, v_ank + 0.012, 1.3 * g["leg"], 0.022, px),
              g["shoes"])
    if g["lower_cut"] == 2:
        paint(_trapezoid(u, v, hip_v - 0.02, hip_v + g["skirt"], hip, 1.45 * hip, px),
              g["lower"])
    else:
        paint(_box(u, v, -hip, hip, hip_v - 0.02, hip_v + 0.05, px), g["lower"])
    arm_len = hip_v - v_sh + 0.06
    for s in (-1.0, 1.0):                  # arms: skin, then the sleeve
        angle = 0.08 + s * view["swing"]
        p0 = (s * (sh - g["arm"]), v_sh + g["arm"])
        p1 = (p0[0] + s * arm_len * math.sin(angle), p0[1] + arm_len * math.cos(angle))
        arm = _capsule(u, v, p0, p1, g["arm"], px)
        paint(arm, g["skin"])
        cuff = p1[1] - 0.04 if g["long_sleeves"] else p0[1] + 0.35 * arm_len
        paint(arm * _soft(cuff - v, px), g["upper"])
    paint(_box(u, v, -0.3 * hr, 0.3 * hr, 1.8 * hr, v_sh + 0.01, px), g["skin"])     # neck
    paint(_trapezoid(u, v, v_sh, hip_v + 0.01, sh, hip, px), g["upper"])            # torso
    if g["carry"] == 2:                    # backpack straps
        for s in (-1.0, 1.0):
            paint(_box(u, v, s * 0.5 * sh - 0.012, s * 0.5 * sh + 0.012, v_sh, hip_v - 0.06,
                       px), g["bag"])
    elif g["carry"] == 1:                  # shoulder bag, strap across the torso
        paint(_capsule(u, v, (-side * 0.6 * sh, v_sh), (side * (sh + 0.03), hip_v - 0.07),
                       0.01, px), g["bag"])
        paint(_box(u, v, side * (sh - 0.01), side * (sh + 0.09), hip_v - 0.09, hip_v + 0.08,
                   px), g["bag"])
    paint(_ellipse(u, v, 0, hr, 0.8 * hr, hr, px), g["skin"])                      # head
    paint(_ellipse(u, v, 0, hr, 0.84 * hr, 1.04 * hr, px) * _soft(0.7 * hr - v, px),
          g["hair"])
    if g["hat"] is not None:
        paint(_box(u, v, -0.95 * hr, 0.95 * hr, -0.02, 0.75 * hr, px), g["hat"])

    t = y / H                                                        # [H, 1] image height
    shade = np.clip(1.0 - 0.25 * (u / (sh + 0.06)) ** 2, 0.6, 1.0)  # round body, lit front-on
    if camera["modality"] == VIS:
        bg = camera["top"] + (camera["bottom"] - camera["top"]) * t[..., None]    # [H, 1, 3]
        bg = np.where(t[..., None] > camera["floor_at"], camera["floor"], bg)
        phase = 2 * np.pi * (camera["tex_freq"] * x / W + camera["phase"] + view["phase"])
        tex = [np.sign(np.sin(phase)) + 0 * t,                                  # panels
               np.sin(phase + 3 * np.pi * t) * np.cos(2 * phase),               # wallpaper
               np.sign(np.sin(2 * np.pi * camera["tex_freq"] * t + 0 * x))][camera["texture"]]
        bg = bg + camera["tex_amp"] * tex[..., None] * np.array([1.0, 0.9, 0.8])
        scene = camera["scene"] + 0.3 * rng.standard_normal((6, 3, 3))    # a static scene
        bg = bg + camera["blob"] * _upsample(scene, H, W)
        img = bg * (1 - cov[..., None]) + col[..., :3] * shade[..., None]
        img = img * (camera["gain"] * view["light"] * camera["cast"])
        img = img + rng.normal(0.0, camera["noise"], img.shape)
    else:
        scene = camera["scene"] + 0.3 * rng.standard_normal((8, 4, 1))    # a static scene
        bg = camera["level"] + camera["slope"] * t + camera["blob"] * _upsample(scene, H, W)[..., 0]
        img = np.clip(bg, 0, 1) * (1 - cov) + col[..., 3] * (0.85 + 0.15 * shade)
        img = np.clip(camera["gain"] * img + camera["offset"], 0, 1) ** camera["gamma"]
        img = img * view["light"]
        if camera["blur"]:                 # thermal optics: 3 x 3 box blur
            pad = np.pad(img, 1, mode="edge")
            img = sum(pad[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0
        img = img + rng.normal(0.0, camera["noise"], img.shape)
        img = np.repeat(img[..., None], 3, axis=2)                  # [H, W, 3], equal channels
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ writers
def _into_fresh_dir(out, write):
    """Run write(tmp) in a sibling temp folder, then swap it in for `out`.

    An existing `out` is replaced only when it holds nothing but a set rendered here: its
    synthetic.json lists every file it wrote ("files"), and no other file may be there. Anything
    else (a real dataset, a run folder, a file a user added, a set of a version that kept no list)
    is refused with the reason, and nothing is touched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        _check_only_ours(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = write(tmp)
        meta["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # last
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_only_ours(out):
    """FileExistsError unless every file under `out` is one that its synthetic.json lists."""
    try:
        listed = json.loads((out / META).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        why = (f"it has no {META}" if not (out / META).is_file() else
               f"its {META} lists no files (written by an older version, or not by this generator)")
        raise FileExistsError(f"out={out} is a non-empty folder and {why}; refusing to replace what "
                              f"may be a real dataset or your files. Give an empty or new folder, or "
                              f"delete this one yourself.")
    extra = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name != META and str(p.relative_to(out)) not in set(listed))
    if extra:
        raise FileExistsError(f"out={out} holds {len(extra)} file(s) this generator did not write "
                              f"(e.g. {', '.join(extra[:3])}); refusing to re-render over them. Move "
                              f"them away, or give an empty or new folder.")


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "RGB").save(path, "JPEG", **JPEG)


def _split_sizes(num_ids):
    """SYSU-style split: test = round(0.30 N), val = round(0.15 N), each >= 1; train the rest."""
    n_test = max(1, int(math.floor(0.30 * num_ids + 0.5)))
    n_val = max(1, int(math.floor(0.15 * num_ids + 0.5)))
    return num_ids - n_test - n_val, n_val, n_test


def _sysu_cameras(seed, pid, is_test):
    """Cameras that have a folder for `pid`: each dropped with MISSING_RATE, but every id keeps
    a visible and an infrared camera, and a test id keeps cam 1 or cam 2 (indoor gallery)."""
    draw = dict(zip(SYSU_CAMS, _rng(seed, _MISS, pid).random(len(SYSU_CAMS))))
    keep = {c for c in SYSU_CAMS if draw[c] >= MISSING_RATE}
    for group in ([1, 2, 4, 5], [3, 6]) + (([1, 2],) if is_test else ()):
        if not keep & set(group):
            keep.add(max(group, key=lambda c: draw[c]))
    return sorted(keep)


def render_sysu(out, num_ids=100, images_per_cam=6, height=128, width=64, seed=0,
                progress=False):
    """Write the SYSU-MM01 layout under `out`; return the meta also written to out/synthetic.json.

    cam{1..6}/{pid:04d}/{NNNN}.jpg (visible cams 1, 2, 4, 5; infrared 3, 6; ids 1..N) and
    exp/{train,val,test}_id.txt, one line of comma-separated ids each (sizes: _split_sizes).
    meta["train_counts"] = {"ids", "vis", "ir"} over train ∪ val, as the SYSU loader counts.
    `out` is replaced as a whole; a non-empty folder without synthetic.json is refused.
    """
    args = dict(num_ids=_check_int("num_ids", num_ids, 3, 9999),
                images_per_cam=_check_int("images_per_cam", images_per_cam, 1, 9999),
                height=_check_int("height", height, 16), width=_check_int("width", width, 8),
                seed=_check_int("seed", seed, 0))
    order = _rng(seed, _SPLIT, 0).permutation(np.arange(1, num_ids + 1)).tolist()
    n_train, n_val, _ = _split_sizes(num_ids)
    split = dict(train=sorted(order[:n_train]), val=sorted(order[n_train:n_train + n_val]),
                 test=sorted(order[n_train + n_val:]))
    cams = {p: _sysu_cameras(seed, p, p in split["test"]) for p in range(1, num_ids + 1)}
    cameras = {c: draw_camera(seed, c, m) for c, m in SYSU_CAMS.items()}
    jobs = [(p, c, k) for p in cams for c in cams[p] for k in range(1, images_per_cam + 1)]

    def counts(ids):
        n = [sum(images_per_cam for p in ids for c in cams[p] if SYSU_CAMS[c] == m)
             for m in (VIS, IR)]
        return dict(ids=len(ids), vis=n[0], ir=n[1])

    def write(root):
        (root / "exp").mkdir()
        for name, ids in split.items():
            (root / "exp" / f"{name}_id.txt").write_text(",".join(map(str, ids)) + "\n")
        ident = (None, None)
        for p, c, k in tqdm(jobs, desc="synthetic SYSU-MM01", unit="img", disable=not progress):
            ident = ident if ident[0] == p else (p, draw_identity(seed, p))
            rng = _rng(seed, _VIEW, p, c, k)
            _save(root / f"cam{c}" / f"{p:04d}" / f"{k:04d}.jpg",
                  render_image(ident[1], cameras[c], draw_view(rng), rng, height, width))
        return dict(generator="vireid demo.synthetic", version=FORMAT_VERSION, layout="sysu",
                    args=args, image=IMAGE_NOTE, splits={k: len(v) for k, v in split.items()},
                    train_counts=counts(split["train"] + split["val"]),
                    test_counts=counts(split["test"]),
                    missing_folders=[f"cam{c}/{p:04d}" for p in cams for c in SYSU_CAMS
                                     if c not in cams[p]])
    return _into_fresh_dir(out, write)


def render_regdb(out, num_ids=100, height=128, width=64, seed=0, progress=False):
    """Write the RegDB layout under `out`; return the meta also written to out/synthetic.json.

    Visible/{pid}/synth_v_{frame:05d}_{pid}.jpg and Thermal/{pid}/synth_t_..., ids 1..N, 10
    frames each; frame k of both modalities shares pose and position (a dual-camera rig, as in
    RegDB). idx/{train,test}_{visible,thermal}_{t}.txt, t = 1..10: lines "<path relative to out>
    <pid - 1>", by pid then frame. Trial t splits floor(N/2) train / rest test ids with its own
    rng; the 10 trials differ whenever C(N, N/2) >= 10.
    """
    args = dict(num_ids=_check_int("num_ids", num_ids, 2, 99999),
                height=_check_int("height", height, 16), width=_check_int("width", width, 8),
                seed=_check_int("seed", seed, 0))
    pids, n_train, trials = list(range(1, num_ids + 1)), num_ids // 2, []
    for t in range(1, REGDB_TRIALS + 1):
        rng = _rng(seed, _SPLIT, t)
        for _ in range(1000):              # redraw a split that an earlier trial already has
            train = tuple(sorted(rng.permutation(pids)[:n_train].tolist()))
            if train not in trials or math.comb(num_ids, n_train) < REGDB_TRIALS:
                break
        trials.append(train)
    cameras = {m: draw_camera(seed, 101 + m, m) for m in (VIS, IR)}
    folder = {VIS: ("Visible", "v"), IR: ("Thermal", "t")}
    rel = lambda m, p, k: f"{folder[m][0]}/{p}/synth_{folder[m][1]}_{k:05d}_{p}.jpg"
    frames = range(1, REGDB_IMAGES + 1)
    counts = lambda n: dict(ids=n, vis=REGDB_IMAGES * n, ir=REGDB_IMAGES * n)

    def write(root):
        for p in tqdm(pids, desc="synthetic RegDB", unit="id", disable=not progress):
            ident = draw_identity(seed, p)
            for k in frames:
                view = draw_view(_rng(seed, _REGDB, p, k, 0))
                for m in (VIS, IR):
                    _save(root / rel(m, p, k), render_image(
                        ident, cameras[m], view, _rng(seed, _REGDB, p, k, 1 + m), height, width))
        (root / "idx").mkdir()
        for t, train in enumerate(trials, start=1):
            for part, ids in (("train", train), ("test", sorted(set(pids) - set(train)))):
                for m, name in ((VIS, "visible"), (IR, "thermal")):
                    lines = "".join(f"{rel(m, p, k)} {p - 1}\n" for p in ids for k in frames)
                    (root / "idx" / f"{part}_{name}_{t}.txt").write_text(lines)
        return dict(generator="vireid demo.synthetic", version=FORMAT_VERSION, layout="regdb",
                    args=args, image=IMAGE_NOTE, trials=REGDB_TRIALS,
                    train_counts=counts(n_train), test_counts=counts(num_ids - n_train))
    return _into_fresh_dir(out, write)


def _llcm_cameras(seed, pid, is_test):
    """{modality: cameras with a folder for `pid`}: each dropped with MISSING_RATE, but every id keeps
    one camera per modality, and a test id two (so each query has a match in another camera)."""
    draws = _rng(seed, _LLCM, pid).random(len(LLCM_CAMS[VIS]) + len(LLCM_CAMS[IR]))
    out, start = {}, 0
    for m, cams in LLCM_CAMS.items():
        draw = dict(zip(cams, draws[start:start + len(cams)]))
        start += len(cams)
        keep = sorted(cams, key=lambda c: -draw[c])[:2 if is_test else 1]   # the least likely to drop
        out[m] = sorted(set(keep) | {c for c in cams if draw[c] >= MISSING_RATE})
    return out


def render_llcm(out, num_ids=90, images_per_cam=2, height=128, width=64, seed=0, progress=False):
    """Write the LLCM layout under `out`; return the meta also written to out/synthetic.json.

    Ids 1..N, a third of them (at least 1) for test. Training images train_{vis,nir}/cam{c}/{pid:04d}/
    {NNNN}.jpg listed in idx/train_vis.txt and idx/train_nir.txt ("<path relative to out> <label>", labels
    0.. in id order); test images test_vis/cam{1..9}/... and test_nir/cam{1,2,4..9}/..., an empty
    test_nir/cam3, and idx/test_id.txt (one line). Visible camN and infrared camN share the viewpoint
    (one camera in two modes); the visible cameras are darker and noisier (LOW_LIGHT).
    meta["train_counts"] = {"ids", "vis", "ir"}, as data.llcm.llcm_train counts them.
    """
    args = dict(num_ids=_check_int("num_ids", num_ids, 2, 9999),
                images_per_cam=_check_int("images_per_cam", images_per_cam, 1, 9999),
                height=_check_int("height", height, 16), width=_check_int("width", width, 8),
                seed=_check_int("seed", seed, 0))
    order = _rng(seed, _SPLIT, 0).permutation(np.arange(1, num_ids + 1)).tolist()
    n_test = max(1, int(math.floor(num_ids / 3 + 0.5)))
    split = dict(train=sorted(order[n_test:]), test=sorted(order[:n_test]))
    cams = {p: _llcm_cameras(seed, p, p in split["test"]) for p in range(1, num_ids + 1)}
    cameras = {}
    for m, keys in LLCM_CAMS.items():
        for c in keys:                     # the same key: the same viewpoint in both modes
            cam = draw_camera(seed, 200 + c, m)
            if m == VIS:
                cam.update(gain=cam["gain"] * LOW_LIGHT, noise=cam["noise"] * 2)
            cameras[m, c] = cam
    rel = lambda part, m, c, p, k: f"{part}_{LLCM_FOLDERS[m]}/cam{c}/{p:04d}/{k:04d}.jpg"   # noqa: E731
    counts = lambda ids: dict(ids=len(ids), **{name: images_per_cam * sum(len(cams[p][m]) for p in ids)
                                               for name, m in (("vis", VIS), ("ir", IR))})   # noqa: E731

    def write(root):
        (root / "idx").mkdir()
        label = {p: i for i, p in enumerate(split["train"])}
        lists = {VIS: [], IR: []}
        for m, keys in LLCM_CAMS.items():
            for c in range(1, 10) if m == IR else keys:      # every camera folder; cam3 stays empty
                (root / f"test_{LLCM_FOLDERS[m]}" / f"cam{c}").mkdir(parents=True)
        jobs = [(p, m, c, k) for p in cams for m in (VIS, IR) for c in cams[p][m]
                for k in range(1, images_per_cam + 1)]
        ident = (None, None)
        for p, m, c, k in tqdm(jobs, desc="synthetic LLCM", unit="img", disable=not progress):
            ident = ident if ident[0] == p else (p, draw_identity(seed, p))
            part = "test" if p in split["test"] else "train"
            rng = _rng(seed, _VIEW, p, 100 * m + c, k)
            _save(root / rel(part, m, c, p, k),
                  render_image(ident[1], cameras[m, c], draw_view(rng), rng, height, width))
            if part == "train":
                lists[m].append(f"{rel(part, m, c, p, k)} {label[p]}\n")
        for m in (VIS, IR):
            (root / "idx" / f"train_{LLCM_FOLDERS[m]}.txt").write_text("".join(lists[m]))
        (root / "idx" / "test_id.txt").write_text(",".join(map(str, split["test"])) + "\n")
        return dict(generator="vireid demo.synthetic", version=FORMAT_VERSION, layout="llcm",
                    args=args, image=IMAGE_NOTE, splits={k: len(v) for k, v in split.items()},
                    train_counts=counts(split["train"]), test_counts=counts(split["test"]))
    return _into_fresh_dir(out, write)


RENDERERS = {"sysu": render_sysu, "regdb": render_regdb, "llcm": render_llcm}


def ensure_synthetic(out, layout="sysu", progress=False, **kwargs):
    """Return out/synthetic.json's meta, rendering first if it is missing or its args differ.

    kwargs are those of render_sysu / render_regdb / render_llcm; defaults are filled in before comparing.
    """
    if layout not in RENDERERS:
        raise ValueError(f"layout must be one of {sorted(RENDERERS)}, got {layout!r}")
    try:
        bound = inspect.signature(RENDERERS[layout]).bind(out, **kwargs)
    except TypeError as err:
        raise TypeError(f"ensure_synthetic(layout={layout!r}): {err}") from None
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("out", "progress")}
    try:
        meta = json.loads((Path(out) / META).read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and (meta.get("version"), meta.get("layout"), meta.get("args")) \
            == (FORMAT_VERSION, layout, args):
        return meta
    return RENDERERS[layout](out, progress=progress, **args)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render the synthetic visible-infrared person "
                                     "dataset in the SYSU-MM01 (default), RegDB or LLCM layout.")
    parser.add_argument("--out", type=str, required=True, help="output folder (replaced)")
    parser.add_argument("--ids", type=int, default=None, help="number of identities (100; LLCM 90)")
    parser.add_argument("--images-per-cam", type=int, default=None,
                        help="images per camera folder (SYSU 6, LLCM 2); RegDB has 10 per id")
    parser.add_argument("--height", type=int, default=128, help="image height (128)")
    parser.add_argument("--width", type=int, default=64, help="image width (64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--regdb", action=argparse.BooleanOptionalAction, default=False,
                        help="write the RegDB layout instead of SYSU-MM01")
    layout.add_argument("--llcm", action=argparse.BooleanOptionalAction, default=False,
                        help="write the LLCM layout instead of SYSU-MM01")
    args = parser.parse_args(argv)
    if args.regdb and args.images_per_cam is not None:
        parser.error("--images-per-cam applies to the SYSU and LLCM layouts only (RegDB: 10 per id)")
    start = time.perf_counter()
    size = dict(height=args.height, width=args.width, seed=args.seed, progress=True)
    if args.ids is not None:
        size["num_ids"] = args.ids
    if args.images_per_cam is not None:
        size["images_per_cam"] = args.images_per_cam
    renderer = render_regdb if args.regdb else render_llcm if args.llcm else render_sysu
    flags = {"num_ids": "--ids", "images_per_cam": "--images-per-cam", "height": "--height",
             "width": "--width", "seed": "--seed"}
    try:
        meta = renderer(args.out, **size)
    except (ValueError, TypeError) as err:
        message = str(err)
        for name, flag in flags.items():
            message = message.replace(name, flag)
        parser.error(message)
    except OSError as err:
        parser.error(str(err))
    tr, te = meta["train_counts"], meta["test_counts"]
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {meta['layout']} layout to {args.out}: {meta['args']}\n"
          f"  train: {tr['ids']} ids, {tr['vis']} vis + {tr['ir']} ir images; "
          f"test: {te['ids']} ids, {te['vis']} vis + {te['ir']} ir images\n"
          f"  {size / 2**20:.1f} MiB on disk, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
