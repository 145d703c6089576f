"""Batched training augmentations: the steps of data/transforms.py's pipelines on a whole batch, on its device.

MULT (He et al., IJCV 2024) and MBMIL (Wang et al., AAAI 2026): the pipelines of data.transforms.train_transforms,
run on uint8 images from the decode-once cache (data/fast/cache.py) with the per-sample parameters of
data/fast/draws.py. Every step is one tensor operation over the batch, or over the images that share a ColorJitter
order; on the CPU, ToTensor's division and Normalize run in blocks of a few images that stay in the processor's cache
(normalize_). Nothing loops over images. Shapes: B images of H x W; uint8 crops [B, C, H, W] (C = 3, or 1 when
a view keeps one channel); views float32 [B, 3, H, W].

Against the per-image pipeline (tests/test_batched.py checks each):
- pad + crop + flip, ColorJitter, ToTensor, Normalize, random erasing, ChannelExchange, ChannelAdapGray: the same
  operations on the same values, bit for bit (a batch of MBMIL's pipelines, or of MULT's stage two, equals
  TrainBatches's). ColorJitter runs before ToTensor on the 8-bit values, with PIL's own arithmetic: its blends
  in float32 truncated to integers, its integer grey, its 8-bit HSV (color_jitter_).
- LinearTransform: rectangles, Beta draws, stopping step and mask M are the per-image loop's, bit for bit
  (data/fast/draws.py); the image is x0 * M in one product where the loop divides and multiplies region by region,
  so values agree to float32 rounding (1e-6 relative).
On a GPU the same holds: ToTensor's / 255 is a true division there too (unit_bytes_), and the device's half
(augment_view) reads nothing back and copies from the host without a wait, the host's half (the plan) having
worked out every size (tests/test_fake_device.py runs it on "cuda"; bench/gpu_check.py compares a GPU's batches).
"""
import numpy as np
import torch


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
# ColorJitter (before ToTensor, as in the per-image pipeline): PIL's own arithmetic on 8-bit values, in place

def jitter_sequences(order, factors, grey):
    """Per image, the adjustments ColorJitter makes, in its drawn order: tuples of indices into ADJUST
    (brightness, contrast, saturation, hue: the order of ColorJitter's factors).

    order: int [n, 4] permutations; factors: float [n, 4] (nan: skipped); grey: bool [n], three equal
    channels, where saturation and hue change nothing (PIL's grey of (v, v, v) is v, and its HSV round trip
    of a grey is the grey) and are skipped.
    """
    seqs = []
    for o, f, g in zip(order.tolist(), factors.tolist(), grey.tolist()):
        seqs.append(tuple(k for k in o if f[k] == f[k] and not (g and k >= 2)))
    return seqs


def color_jitter_(x, seqs, factors):
    """Brightness, contrast, saturation and hue of each image in the order of seqs, in place, as PIL computes them.

    x: float32 [n, C, H, W] holding the 8-bit values 0 .. 255 of the images (C = 3, or 1 for grey images:
    brightness and contrast only); seqs: from jitter_sequences, images with equal sequences consecutive (sort by
    them first), one group of images a call per adjustment; factors: float64 [n, 4] on x's device, as drawn.
    Bit for bit PIL's result (tests/test_batched.py): brightness, contrast and saturation are PIL's blend of the
    image with a degenerate one (black; the mean grey, rounded; the grey), out = trunc(d + f (x - d)) in float32
    with f the float32 factor, clipped to 0 .. 255; the grey is PIL's integer L = (19595 R + 38470 G + 7471 B +
    2^15) >> 16; hue goes through PIL's own 8-bit HSV (tables made by PIL, hsv_tables) and turns the hue byte by
    int(255 f), wrapping, as torchvision does.
    """
    start = 0
    while start < len(seqs):
        end = start
        while end < len(seqs) and seqs[end] == seqs[start]:
            end += 1
        part, f = x[start:end], factors[start:end]                       # a view; [m, 4]
        for k in seqs[start]:
            ADJUST[k](part, f[:, k])
        start = end
    return x


def _blend_(x, degenerate, f):
    """PIL's Image.blend(degenerate, x, f) of 8-bit values: trunc(d + f (x - d)) in float32, clipped, in place."""
    f = f.to(torch.float32)[:, None, None, None]
    x.sub_(degenerate).mul_(f).add_(degenerate).floor_().clamp_(0.0, 255.0)


def _grey(x):
    """PIL's convert("L") of 8-bit RGB: (19595 R + 38470 G + 7471 B + 2^15) >> 16, [n, 1, H, W]; every step exact
    in float32 (the sum stays below 2^24). A one-channel (grey) image is its grey."""
    if x.shape[1] == 1:
        return x
    total = (x[:, 0:1] * 19595).add_(x[:, 1:2], alpha=38470).add_(x[:, 2:3], alpha=7471).add_(32768)
    return total.div_(65536).floor_()


def _brightness(x, f):
    """ImageEnhance.Brightness: the blend with black."""
    _blend_(x, 0.0, f)


def _contrast(x, f):
    """ImageEnhance.Contrast: the blend with the mean of the grey, rounded to an integer (PIL's int(mean + 0.5))."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64)     # exact: a sum of integers
    _blend_(x, mean.add_(0.5).floor_().to(x.dtype), f)


def _saturation(x, f):
    """ImageEnhance.Color: the blend with the image's grey."""
    _blend_(x, _grey(x), f)


def _hue(x, f):
    """torchvision's adjust_hue on a PIL image: to PIL's 8-bit HSV, the hue byte + int(255 f) (wrapping), back."""
    to_hsv, to_rgb = hsv_tables(x.device)
    m, _, height, width = x.shape
    v = x.to(torch.int32)
    rgb = (v[:, 0] << 16).bitwise_or_(v[:, 1] << 8).bitwise_or_(v[:, 2]).view(-1)        # 65536 R + 256 G + B
    hsv = to_hsv.index_select(0, rgb).view(m, height, width)                           # 65536 H + 256 S + V
    shift = hue_shift(f).view(m, 1, 1) << 16
    hsv = (hsv + shift).bitwise_and_(0xFFFFFF)                                         # the hue byte wraps
    out = to_rgb.index_select(0, hsv.view(-1)).view(m, height, width)
    for c, bits in enumerate((16, 8, 0)):
        x[:, c] = (out >> bits).bitwise_and_(255)


def hue_shift(f):
    """The hue byte's shift of each hue factor, int(255 f) mod 256 (torchvision's): int32, f float64 as drawn."""
    return torch.trunc(f * 255).to(torch.int32).remainder_(256)


ADJUST = (_brightness, _contrast, _saturation, _hue)
_HSV_TABLES = {}


def hsv_tables(device="cpu"):
    """PIL's RGB -> HSV and HSV -> RGB conversions of all 2^24 8-bit triples, made by PIL itself: int32 [2^24]
    each (64 MB), the triple (a, b, c) at 65536 a + 256 b + c, its image packed the same way. Made once per
    process (DataLoader workers forked after it share it) and copied once to each device: "cuda" and "cuda:0" are
    the same device when 0 is the current one, and one key."""
    if "cpu" not in _HSV_TABLES:
        from PIL import Image
        every = np.arange(2 ** 24, dtype=np.uint32)
        triples = np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=1).astype(np.uint8)
        triples = triples.reshape(4096, 4096, 3)
        to_hsv = np.asarray(Image.fromarray(triples, "RGB").convert("HSV")).reshape(-1, 3)
        to_rgb = np.asarray(Image.fromarray(triples, "HSV").convert("RGB")).reshape(-1, 3)
        pack = lambda t: torch.from_numpy((t[:, 0].astype(np.int32) << 16) | (t[:, 1].astype(np.int32) << 8)
                                          | t[:, 2].astype(np.int32))
        _HSV_TABLES["cpu"] = (pack(to_hsv), pack(to_rgb))
    key = str(resolved(device))
    if key not in _HSV_TABLES:
        _HSV_TABLES[key] = tuple(t.to(key) for t in _HSV_TABLES["cpu"])
    return _HSV_TABLES[key]


def resolved(device):
    """The device a tensor made on `device` lands on: an accelerator without an index is its current one."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        return torch.device(device.type, getattr(torch, device.type).current_device())
    return device


# ---------------------------------------------------------------------------------------------------
# LinearTransform (after ToTensor), in place

def linear_(x, masks):
    """x *= M, M expanded from each image's grid of cells (data.fast.draws.LinearMasks): x float [n, 3, H, W]."""
    n, _, height, width = x.shape
    m = _on(masks.mask, x.device)                                # [n, 3, G_y, G_x]
    gy = m.shape[2]
    m = torch.gather(m, 3, _on(masks.columns, x.device)[:, None, None, :].expand(n, 3, gy, width))  # [n, 3, G_y, W]
    rows = _on(masks.rows, x.device)[:, None, :] + torch.arange(n * 3, device=x.device).view(n, 3, 1) * gy
    m = m.view(n * 3 * gy, width).index_select(0, rows.view(-1))                   # [n 3 H, W]
    return x.mul_(m.view(n, 3, height, width))


# ---------------------------------------------------------------------------------------------------
# ToTensor's / 255 and Normalize, random erasing, ChannelExchange / ChannelAdapGray

# About 2 MB of float32 images a block (4 at 288 x 144). On this project's 2-core CPU, with transparent huge pages,
# the blocks made the feature extraction's input from the cache 1.5x and MULT stage two's v0 view 1.2x faster
# at that size (bench/bench_input.py).
CPU_BLOCK_BYTES = 2 << 20


def normalize_(x, chan, mean, std, from_bytes=False):
    """TF.normalize in place: plane p of image i is channel chan[i, p]; x float [n, C, H, W].

    from_bytes: x holds the 8-bit values 0 .. 255, and ToTensor's / 255 comes first (the same division,
    unit_bytes_). On the CPU this runs in blocks of images of about CPU_BLOCK_BYTES, each block through all its
    passes while it is in the processor's cache, instead of each pass streaming the whole batch through memory:
    every step is per element, so the blocks change no value.
    """
    chan = _on(chan, x.device)
    mean, std = mean[chan][:, :, None, None], std[chan][:, :, None, None]
    step = max(1, len(x) if x.device.type != "cpu" else CPU_BLOCK_BYTES * len(x) // max(x.nbytes, 1))
    for i in range(0, len(x), step):
        block = x[i:i + step]
        if from_bytes:
            unit_bytes_(block)
        block.sub_(mean[i:i + step]).div_(std[i:i + step])
    return x


def unit_bytes_(x):
    """ToTensor's x / 255 in place, x float holding 8-bit values. The divisor is a tensor on x's device: CUDA
    multiplies by the float32 reciprocal of a number (or of a CPU scalar), which puts 126 of the 256 byte values
    1 ulp off the true quotient that PIL's ToTensor computes on the host; a device tensor gets a true division."""
    return x.div_(torch.full((), 255.0, dtype=x.dtype, device=x.device))


def erase_(x, chan, rect, fill):
    """Random erasing in place: rect[i] = (top, left, h, w) of every plane of image i gets fill[chan[i, p]].

    x: float [n, C, H, W]; chan: int64 [n, C]; rect: int64 CPU [n, 4], h = 0 for no erasing; fill: float32 [3].
    Only the rows the rectangles cross are read and written (x * 1 + 0 outside, x * 0 + fill inside: exact).
    The host's half (erase_rows, in the plan) and the device's (erase_rows_).
    """
    n, c, height, width = x.shape
    return erase_rows_(x, erase_rows(chan, rect, c, height, width), fill)


def erase_rows(chan, rect, planes, height, width):
    """The host half of erase_, from CPU tensors: which images are erased and how many rows of the [n C H, W] view
    that makes, None if none: {"hit": int64 [k] the images, "rect": int64 [k, 4], "chan": int64 [k C] the channel
    whose fill each of their planes takes, "total": the rows, an int}. A few bytes, whatever the rectangles' size:
    the rows themselves are laid out on the device, which needs only `total` to do so without a wait."""
    hit = torch.nonzero(rect[:, 2] > 0).squeeze(1)
    if not hit.numel():
        return None
    return {"hit": hit, "rect": rect[hit], "chan": chan[hit].reshape(-1), "total": int(rect[hit, 2].sum()) * planes}


def erase_rows_(x, rows, fill):
    """The device half of erase_: x float [n, C, H, W] in place, rows from erase_rows (None: nothing erased);
    fill float32 [3] on x's device. Every size is known on the host (output_size), so nothing is read back."""
    if rows is None:
        return x
    n, c, height, width = x.shape
    dev, total = x.device, rows["total"]
    hit, chan = _on(rows["hit"], dev), _on(rows["chan"], dev)
    top, left, h, w = _on(rows["rect"], dev).unbind(1)
    reps = h.repeat_interleave(c)                                # rows per (erased image, plane)
    first = (hit[:, None] * c + torch.arange(c, device=dev)).reshape(-1) * height + top.repeat_interleave(c)
    starts = torch.cumsum(reps, 0) - reps
    row = first.repeat_interleave(reps, output_size=total) \
        + torch.arange(total, device=dev) - starts.repeat_interleave(reps, output_size=total)   # [R] flat rows
    cols = torch.arange(width, device=dev)
    inside = ((cols >= left[:, None]) & (cols < (left + w)[:, None])).to(x.dtype)          # [k, W]
    inside = inside.repeat_interleave(c, dim=0).repeat_interleave(reps, dim=0, output_size=total)   # [R, W]
    value = fill[chan].repeat_interleave(reps, output_size=total)[:, None]
    flat = x.view(n * c * height, width)
    band = flat.index_select(0, row)
    band.mul_(1 - inside).addcmul_(inside, value)
    flat.index_copy_(0, row, band)
    return x


def grey_(x, rows):
    """ChannelAdapGray's / ChannelExchange's grey in place for the images `rows` (int64 [k] their indices, on the
    host, from the plan): data.transforms._grey in all three."""
    if rows.numel():
        g = _on(rows, x.device)
        y = x.index_select(0, g)
        one = 0.2989 * y[:, 0] + 0.5870 * y[:, 1] + 0.1140 * y[:, 2]          # the same operations, same order
        x.index_copy_(0, g, one[:, None].expand(-1, 3, -1, -1).contiguous())
    return x


def augment_view(parts, mean, std, fill, shape):
    """One view's device steps from its plan (data.fast.loader.CachedTrainBatches.plan): float32 `shape` [B, 3, H, W].

    parts: the view's images in parts (all of one crop), each {"crop": uint8 [m, C, H, W], "pos": int64 [m]
    batch positions, "jitter": (sequences, factors) or None, "linear": LinearMasks or None, "tail": groups},
    a group {"idx": rows of the part, "chan": int64 [k, 1 or 3] the channel each output plane is, "rect",
    "all": the group is the whole part, "erase": erase_rows', "grey_rows": the grey images' indices}: a
    part's images go through ColorJitter and LinearTransform (ToTensor's division just before it), then each group
    through ToTensor's division where it has not run yet, Normalize, erasing and the channel step. C = 1 crops one
    channel: the channel a group keeps, or (grey images) the one channel all three repeat.
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
    x = _on(part["crop"], dev).to(torch.float32)                         # [m, C, H, W], the 8-bit values
    if part["jitter"] is not None:                                        # ColorJitter, before ToTensor
        seqs, factors = part["jitter"]
        color_jitter_(x, seqs, _on(factors, dev))
    linear = part["linear"]
    if linear is not None:                       # LinearTransform works on ToTensor's values: divide first
        unit_bytes_(x)
        linear_(x, linear)
    for g in part["tail"]:
        idx, three = _on(g["idx"], dev), g["chan"].shape[1] == 3
        if x.shape[1] == 3 and not three:
            y = x[idx, _on(g["chan"][:, 0], dev)][:, None]                    # the kept channel
        elif x.shape[1] == 1 and three:
            y = x.index_select(0, idx).expand(-1, 3, -1, -1).contiguous()     # a grey image's one channel
        else:
            y = x if g["all"] else x.index_select(0, idx)
        normalize_(y, g["chan"], mean, std, from_bytes=linear is None)        # with ToTensor's / 255 if not yet
        erase_rows_(y, g["erase"], fill)
        if y.shape[1] == 3:
            grey_(y, g["grey_rows"])
        if out is None:
            return y
        _write(out, _on(part["pos"], dev)[idx], y, part["in_order"] and g["all"])
    return out


def _on(t, device):
    """t on `device`; a copy from the host does not wait for the device (pinned plans are copied by DMA; a
    pageable source is staged by the driver before the call returns)."""
    return t.to(device, non_blocking=t.device.type == "cpu")


def _write(out, pos, x, whole):
    """out[pos] = x, a one-plane x in all three channels."""
    if whole:
        out.copy_(x.expand(out.shape))
    elif x.shape[1] == 3:
        out.index_copy_(0, pos, x)
    else:
        out.index_put_((pos,), x.expand(-1, 3, -1, -1))
