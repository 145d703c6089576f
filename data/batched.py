"""Batched training augmentations: the steps of data/transforms.py's pipelines on a whole batch, on its device.

MULT (He et al., IJCV 2024) and MBMIL (Wang et al., AAAI 2026): the pipelines of data.transforms.train_transforms,
run on uint8 images from the decode-once cache (data/cache.py) with the per-sample parameters of data/draws.py.
Every step is one tensor operation over the batch, or over the images that share a ColorJitter order; nothing
loops over images. Shapes: B images of H x W; uint8 crops [B, C, H, W] (C = 3, or 1 when a view keeps one
channel); views float32 [B, 3, H, W].

Against the per-image pipeline (tests/test_batched.py checks each):
- pad + crop + flip, ToTensor, Normalize, random erasing, ChannelExchange, ChannelAdapGray: the same operations
  on the same values, bit for bit (a stage-two batch equals TrainBatches's).
- LinearTransform: rectangles, Beta draws, stopping step and mask M are the per-image loop's, bit for bit
  (data/draws.py); the image is x0 * M in one product where the loop divides and multiplies region by region,
  so values agree to float32 rounding (1e-6 relative).
- ColorJitter: the per-image pipeline adjusts the PIL image, and PIL truncates to uint8 after each adjustment,
  uses an integer grey (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16) and an 8-bit HSV; here the same formulas
  run in float32 on [0, 1] without the intermediate rounding: the grey 0.299 R + 0.587 G + 0.114 B, contrast's
  mean grey rounded to an 8-bit level as PIL rounds it, the hue turned by PIL's own step, int(255 h) / 255.
  Measured against PIL, in 1/255: brightness and contrast at most 1 (the truncation), saturation at most 1.24,
  hue mean 0.48, 99th percentile 3.8, max 11 (low-saturation pixels, where 8-bit HSV is coarse); a whole
  visible view after ChannelExchange mean 1.1-1.2, 99th percentile 4-6, max 10-15; a grey infrared view, where
  saturation and hue change nothing, mean 0.8, max 2.3.
"""
import torch

LUMA = (0.299, 0.587, 0.114)   # PIL's "L" weights (ITU-R 601-2), used by contrast and saturation


# ---------------------------------------------------------------------------------------------------
# Geometry: Pad + RandomCrop + RandomHorizontalFlip, on uint8

def crop(src, rows, top, left, flip, pad, channels=None):
    """Zero-pad by `pad`, crop H x W at (top, left) of the padded image, mirror where flip: uint8 [n, C, H, W].

    src:      uint8 [N, 3, H, W] (the cache, or images already gathered from it), any device
    rows:     int64 [n] images of src; top, left: int64 [n] in 0 .. 2 pad; flip: bool [n]
    channels: None (C = 3), or int64 [n] (C = 1: that channel only)
    Output pixel (i, j) is src pixel (i + top - pad, J), J = (W - 1 - j if flip else j) + left - pad, and 0
    outside the image: what TF.pad, TF.crop and TF.hflip do to the PIL image.
    """
    _, _, height, width = src.shape
    dev, hw = src.device, height * width
    rows, top, left, flip = (torch.as_tensor(v, device=dev) for v in (rows, top, left, flip))
    n = rows.numel()
    chan = torch.arange(3, device=dev).expand(n, 3) if channels is None \
        else torch.as_tensor(channels, device=dev).view(n, 1)
    c = chan.shape[1]
    dy, dx = top - pad, left - pad
    # The planes, with a margin of the largest shift at both ends; a shift by (dy, dx) of a plane is then the
    # window of H W bytes that starts dy W + dx bytes later: one copy shifts a whole plane. What a window
    # reads beyond its row or plane lies where the padding goes, and is zeroed below.
    margin = pad * width + pad
    buf = torch.empty(n * c * hw + 2 * margin, dtype=torch.uint8, device=dev)
    torch.index_select(src.reshape(-1, hw), 0, (rows[:, None] * 3 + chan).reshape(-1),
                       out=buf[margin:margin + n * c * hw].view(n * c, hw))
    starts = margin + torch.arange(n * c, device=dev) * hw + (dy * width + dx).repeat_interleave(c)
    out = buf.as_strided((buf.numel() - hw + 1, hw), (1, 1)).index_select(0, starts).view(n, c, height, width)
    mirrored = torch.nonzero(flip).squeeze(1)
    if mirrored.numel():
        flipped = out.index_select(0, mirrored).flip(-1)
        if width % 4 == 0:                      # whole images as int32: index_copy_ runs at memcpy speed
            out.view(torch.int32).index_copy_(0, mirrored, flipped.view(torch.int32))
        else:
            out[mirrored] = flipped
    cols = torch.arange(width, device=dev).expand(n, width)
    cols = torch.where(flip[:, None], width - 1 - cols, cols) + dx[:, None]     # source column of each column
    out.mul_(((cols >= 0) & (cols < width)).to(torch.uint8)[:, None, None, :])  # zero the padding columns
    src_row = torch.arange(height, device=dev) + dy[:, None]                     # and the padding rows
    outside = (src_row < 0) | (src_row >= height)
    if bool(outside.any()):
        bad = torch.nonzero(outside.unsqueeze(1).expand(n, c, height).reshape(-1)).squeeze(1)
        out.view(n * c * height, width).index_fill_(0, bad, 0)
    return out


# ---------------------------------------------------------------------------------------------------
# ColorJitter (before ToTensor in the per-image pipeline; here on float [0, 1], in place)

def jitter_sequences(order, factors, grey):
    """Per image, the adjustments ColorJitter makes, in its drawn order: tuples of indices into ADJUST
    (brightness, contrast, saturation, hue: the order of ColorJitter's factors).

    order: int [n, 4] permutations; factors: float [n, 4] (nan: skipped); grey: bool [n], three equal
    channels, where saturation and hue change nothing (PIL's grey of (v, v, v) is v, its hue shift keeps
    (v, v, v)) and are skipped.
    """
    seqs = []
    for o, f, g in zip(order.tolist(), factors.tolist(), grey.tolist()):
        seqs.append(tuple(k for k in o if f[k] == f[k] and not (g and k >= 2)))
    return seqs


def color_jitter_(x, seqs, factors):
    """Brightness, contrast, saturation and hue of each image in the order of seqs, in place.

    x: float [n, C, H, W] in [0, 1], C = 3, or 1 for grey images (brightness and contrast only); seqs: from
    jitter_sequences, images with equal sequences consecutive (sort by them first), one group of images a
    call per adjustment; factors: float [n, 4] on x's device (hue as drawn, in [-0.5, 0.5]).
    """
    start = 0
    while start < len(seqs):
        end = start
        while end < len(seqs) and seqs[end] == seqs[start]:
            end += 1
        part, f = x[start:end], factors[start:end, :, None, None, None]   # a view; [m, 4, 1, 1, 1]
        for k in seqs[start]:
            ADJUST[k](part, f[:, k])
        start = end
    return x


def _luma(x):
    """PIL's grey in float: 0.299 R + 0.587 G + 0.114 B, [n, 1, H, W]; a one-channel (grey) image is its grey."""
    if x.shape[1] == 1:
        return x
    return (x[:, 0:1] * LUMA[0]).add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])


def _brightness(x, f):
    """PIL: blend with black, f * x, clipped."""
    x.mul_(f).clamp_(max=1.0)


def _contrast(x, f):
    """PIL: blend with the mean grey, rounded to an 8-bit level: m + f (x - m), clipped."""
    m = _luma(x).mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64)   # float64: no thread-count dependence
    m = m.mul_(255).add_(0.5).floor_().div_(255).to(x.dtype)
    x.sub_(m).mul_(f).add_(m).clamp_(0.0, 1.0)


def _saturation(x, f):
    """PIL: blend with the image's grey: L + f (x - L), clipped."""
    grey = _luma(x)
    x.sub_(grey).mul_(f).add_(grey).clamp_(0.0, 1.0)


def _hue(x, f):
    """PIL: shift the HSV hue by int(255 f) / 255 of a turn (value and saturation kept).

    In sextants h6 in [0, 6) of the hexagonal hue, with chroma c = max - min: channel n of the result is
    max - c * clamp(min(k, 4 - k), 0, 1), k = (h6 + shift + n) mod 6, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    top = torch.maximum(torch.maximum(r, g), b)
    chroma = top - torch.minimum(torch.minimum(r, g), b)
    is_r = (r == top).to(x.dtype)                                # ties as PIL: R, then G, then B
    is_g = (g == top).to(x.dtype).mul_(1 - is_r)
    # R max: (G - B) / c; G max: 2 + (B - R) / c; B max: 4 + (R - G) / c
    h6 = (r - g).add_(chroma, alpha=4)                           # B max
    h6.add_(is_r * ((g - b) - h6)).add_(is_g * ((b - r).add_(chroma, alpha=2) - h6))
    h6.div_(chroma.clamp(min=1e-12))                             # chroma 0: any h6, and the result is max
    h6.add_(torch.trunc(f[:, 0] * 255) / 255 * 6)                # PIL's shift, [m, 1, 1]
    h6.sub_(torch.floor(h6 * (1 / 6)), alpha=6)                  # mod 6, to [0, 6)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = h6 + n                                               # in [1, 11)
        k.sub_(torch.floor(k * (1 / 6)), alpha=6)
        k = torch.minimum(k, 4 - k).clamp_(0.0, 1.0)
        torch.addcmul(top, chroma, k, value=-1, out=x[:, channel])


ADJUST = (_brightness, _contrast, _saturation, _hue)


# ---------------------------------------------------------------------------------------------------
# LinearTransform (after ToTensor), in place

def linear_(x, masks):
    """x *= M, M expanded from each image's grid of cells (data.draws.LinearMasks): x float [n, 3, H, W]."""
    n, _, height, width = x.shape
    m = masks.mask.to(x.device)                                  # [n, 3, G_y, G_x]
    gy = m.shape[2]
    m = torch.gather(m, 3, masks.columns.to(x.device)[:, None, None, :].expand(n, 3, gy, width))  # [n, 3, G_y, W]
    rows = masks.rows.to(x.device)[:, None, :] + torch.arange(n * 3, device=x.device).view(n, 3, 1) * gy
    m = m.view(n * 3 * gy, width).index_select(0, rows.view(-1))                   # [n 3 H, W]
    return x.mul_(m.view(n, 3, height, width))


# ---------------------------------------------------------------------------------------------------
# ToTensor, Normalize, random erasing, ChannelExchange / ChannelAdapGray

def to_tensor(crops, out=None):
    """ToTensor of uint8 [n, C, H, W]: float32 values / 255, as TF.to_tensor computes them (into out if given)."""
    out = torch.empty(crops.shape, device=crops.device) if out is None else out
    return out.copy_(crops).div_(255)


def normalize_(x, chan, mean, std):
    """TF.normalize in place: plane p of image i is channel chan[i, p]; x float [n, C, H, W]."""
    chan = chan.to(x.device)
    return x.sub_(mean[chan][:, :, None, None]).div_(std[chan][:, :, None, None])


def erase_(x, chan, rect, fill):
    """Random erasing in place: rect[i] = (top, left, h, w) of every plane of image i gets fill[chan[i, p]].

    x: float [n, C, H, W]; chan: int64 [n, C]; rect: int64 CPU [n, 4], h = 0 for no erasing; fill: float32 [3].
    Only the rows the rectangles cross are read and written (x * 1 + 0 outside, x * 0 + fill inside: exact).
    """
    n, c, height, width = x.shape
    hit = torch.nonzero(rect[:, 2] > 0).squeeze(1)
    if not hit.numel():
        return x
    top, left, h, w = rect[hit].unbind(1)
    reps = h.repeat_interleave(c)                                # rows per (erased image, plane)
    total = int(reps.sum())
    first = (hit[:, None] * c + torch.arange(c)).reshape(-1) * height + top.repeat_interleave(c)
    starts = torch.cumsum(reps, 0) - reps
    dev = x.device
    reps, first, starts = reps.to(dev), first.to(dev), starts.to(dev)
    row = first.repeat_interleave(reps, output_size=total) \
        + torch.arange(total, device=dev) - starts.repeat_interleave(reps, output_size=total)   # [R] flat rows
    cols = torch.arange(width, device=dev)
    left, w = left.to(dev), w.to(dev)
    inside = ((cols >= left[:, None]) & (cols < (left + w)[:, None])).to(x.dtype)          # [n_hit, W]
    inside = inside.repeat_interleave(c, dim=0).repeat_interleave(reps, dim=0, output_size=total)   # [R, W]
    value = fill[chan.to(dev)[hit.to(dev)].reshape(-1)].repeat_interleave(reps, output_size=total)[:, None]
    rows = x.view(n * c * height, width)
    band = rows.index_select(0, row)
    band.mul_(1 - inside).addcmul_(inside, value)
    rows.index_copy_(0, row, band)
    return x


def grey_(x, grey):
    """ChannelAdapGray's / ChannelExchange's grey in place for images grey[i]: data.transforms._grey in all three."""
    g = torch.nonzero(grey).squeeze(1)
    if g.numel():
        g = g.to(x.device)
        y = x.index_select(0, g)
        one = 0.2989 * y[:, 0] + 0.5870 * y[:, 1] + 0.1140 * y[:, 2]          # the same operations, same order
        x.index_copy_(0, g, one[:, None].expand(-1, 3, -1, -1).contiguous())
    return x


def augment_view(parts, mean, std, fill, shape):
    """One view's device steps from its plan (data.loader.CachedTrainBatches.plan): float32 `shape` [B, 3, H, W].

    parts: the view's images in parts (all of one crop), each {"crop": uint8 [m, C, H, W], "pos": int64 [m]
    batch positions, "jitter": (sequences, factors) or None, "linear": LinearMasks or None, "tail": groups},
    a group {"idx": rows of the part, "chan": int64 [k, 1 or 3] the channel each output plane is, "rect",
    "grey", "all": the group is the whole part}: a part's images go through ToTensor, LinearTransform,
    ColorJitter, then each group through Normalize, erasing and the channel step. C = 1 crops one channel:
    the channel a group keeps, or (grey images) the one channel all three repeat.
    """
    dev = mean.device
    first = parts[0]
    if len(parts) == 1 and first["in_order"] and first["crop"].shape[1] == 3 and len(first["tail"]) == 1 \
            and first["tail"][0]["chan"].shape[1] == 3:
        return _part(first, mean, std, fill, None)           # every image keeps its three channels, in order
    out = torch.empty(shape, device=dev)
    for part in parts:
        _part(part, mean, std, fill, out)
    return out


def _part(part, mean, std, fill, out):
    dev = mean.device
    x = to_tensor(part["crop"].to(dev, non_blocking=True))                    # [m, C, H, W]
    if part["linear"] is not None:
        linear_(x, part["linear"])
    if part["jitter"] is not None:
        seqs, factors = part["jitter"]
        color_jitter_(x, seqs, factors.to(dev))
    for g in part["tail"]:
        idx, three = g["idx"].to(dev), g["chan"].shape[1] == 3
        if x.shape[1] == 3 and not three:
            y = x[idx, g["chan"][:, 0].to(dev)][:, None]                      # the kept channel
        elif x.shape[1] == 1 and three:
            y = x.index_select(0, idx).expand(-1, 3, -1, -1).contiguous()     # a grey image's one channel
        else:
            y = x if g["all"] else x.index_select(0, idx)
        _tail(y, g, mean, std, fill)
        if out is None:
            return y
        _write(out, part["pos"].to(dev)[idx], y, part["in_order"] and g["all"])
    return out


def _tail(x, g, mean, std, fill):
    normalize_(x, g["chan"], mean, std)
    erase_(x, g["chan"], g["rect"], fill)
    if x.shape[1] == 3:
        grey_(x, g["grey"])
    return x


def _write(out, pos, x, whole):
    """out[pos] = x, a one-plane x in all three channels."""
    if whole:
        out.copy_(x.expand(out.shape))
    elif x.shape[1] == 3:
        out.index_copy_(0, pos, x)
    else:
        out.index_put_((pos,), x.expand(-1, 3, -1, -1))
