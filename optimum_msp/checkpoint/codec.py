"""The compact codec: a pruned weight as its kept values plus a packed bitmask or N:M indices, optionally
deflated. Pure tensor code (no model, no files); :mod:`optimum_msp.checkpoint` writes and reads checkpoints with it.

A compact checkpoint (written by :func:`optimum_msp.checkpoint.save_compact`) is an ordinary ``save_pretrained``
folder (``config.json`` with the ``sparsity_plan``, ``model.safetensors`` or shards, generation config) in which
every pruned layer's ``weight`` is replaced by:

``<layer>.weight``
    the kept values, 1-D, in the weight's dtype;
``<layer>.weight_msp_mask`` (encoding *bitmask*)
    one bit per weight of the stored tensor, row-major, least significant bit first, packed in ``uint8``;
``<layer>.weight_msp_index`` (encoding *N:M*)
    for every group of ``M`` consecutive inputs, the positions (``ceil(log2 M)`` bits each: 2 bits for M=4,
    3 bits for M=8) of its ``N`` value slots, packed in ``uint8``;
``<layer>.weight_msp_meta``
    ``int64 [encoding, dim0, dim1, n, m, transposed]``: how to rebuild the stored ``[dim0, dim1]`` tensor;
    with two more numbers ``[..., codec, dtype]`` when the tensors above are deflated (below).
``<layer>.weight_msp_zsizes`` (codec *deflate*, ``compact="deflate"``)
    ``int64 [block, count_values, sizes..., count_aux, sizes...]``: the kept values and the mask/indices are
    then stored as ``uint8`` zlib streams, one per byte plane (for bf16: the low bytes, then the
    sign/exponent bytes, which compress well) of every ``block`` consecutive elements. Lossless; on
    SmolLM2-135M the kept bf16 values shrink to about 0.61x (see docs/checkpoints.md).

Every other tensor is stored as is. For each layer the smaller of dense / bitmask / N:M is written, so a
layer that is barely sparse stays dense. Sizes per weight: bitmask ``1 bit + (1 - s) * bits``, N:M
``n/m * (bits + ceil(log2 m))``; in bf16 that is 0.5625x dense at 50 % and 0.3125x at 75 % (2:8: 0.297x).

``config.json`` carries ``quantization_config = {"quant_method": "msp", "checkpoint_format": "compact"}``,
which routes ``AutoModelForCausalLM.from_pretrained(folder)`` through :mod:`optimum_msp`'s quantizer once
``optimum_msp`` is imported: each layer is decompressed tensor by tensor while loading (peak memory does not
exceed loading the dense checkpoint), then the weights are verified against the plan. Stock transformers
without ``optimum_msp`` cannot use a compact checkpoint and fails loudly (the kept values have the wrong shape
for ``weight``); save without ``compact=True`` for checkpoints that must load everywhere.

Zeros are restored as ``+0.0``: a pruned weight that was ``-0.0`` in memory comes back as ``+0.0`` (equal
under ``==`` / ``torch.equal``, identical logits), every other bit is preserved.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Dict, Optional

import torch

from ..plan import LayerTarget

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MASK_SUFFIX = "_msp_mask"
INDEX_SUFFIX = "_msp_index"
META_SUFFIX = "_msp_meta"
ZSIZES_SUFFIX = "_msp_zsizes"
#: names the loader collects for one ``weight`` (the first is the kept values, or the dense weight itself)
SERIALIZED_NAMES = ["weight", "weight" + MASK_SUFFIX, "weight" + INDEX_SUFFIX, "weight" + META_SUFFIX,
                    "weight" + ZSIZES_SUFFIX]

BITMASK = 1
NM = 2
_ENCODINGS = {BITMASK: "bitmask", NM: "n:m"}
#: ``compact=`` values of ``save_pretrained``: the sparse encodings alone, or with their tensors deflated
COMPACT_MODES = {True: None, "sparse": None, "deflate": "deflate"}
DEFLATE = 1
DEFLATE_BLOCK = 1 << 16  # elements per zlib stream: bounded temporaries when inflating, negligible ratio cost
DEFLATE_LEVEL = 1  # level 6 gains ~4 % more at ~3x the time; saving a 7B model must stay practical
_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16, 3: torch.float64}  # of deflated values
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CompactFormatError(ValueError):
    """A compact tensor group that cannot be decoded (corrupted or hand-edited checkpoint)."""


# ------------------------------------------------------------------------------------------------ bit packing
#: codes are (un)packed this many at a time, so temporaries stay small whatever the layer size (multiple of 8)
CHUNK = 1 << 16
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.uint8)  # byte -> its 8 bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the integer ``codes`` (each ``< 2**bits``, flattened) into ``uint8``, least significant bit first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}.")
    codes = codes.reshape(-1)
    packed = torch.empty(math.ceil(codes.numel() * bits / 8), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32)
    for start in range(0, codes.numel(), CHUNK):
        chunk = codes[start : start + CHUNK].to(torch.int32)
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)
        padding = (-stream.numel()) % 8  # only in the last chunk
        if padding:
            stream = torch.cat([stream, stream.new_zeros(padding)])
        offset = start * bits // 8
        packed[offset : offset + stream.numel() // 8] = (stream.view(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, count: int, start: int = 0, stop: Optional[int] = None
                 ) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: codes ``start:stop`` (default all ``count``) as ``uint8``.

    ``start`` must be a multiple of 8 (whole bytes for any ``bits``).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CompactFormatError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}.")
    if packed.numel() != math.ceil(count * bits / 8):
        raise CompactFormatError(
            f"expected {math.ceil(count * bits / 8)} bytes for {count} codes of {bits} bits, found {packed.numel()}."
        )
    stop = count if stop is None else min(stop, count)
    first = start * bits // 8
    last = math.ceil(stop * bits / 8)
    stream = _BYTE_BITS[packed[first:last].long()].view(-1)[: (stop - start) * bits]
    if bits == 1:
        return stream
    return (stream.view(-1, bits).to(torch.int32) * _BIT_WEIGHTS[:bits]).sum(1).to(torch.uint8)


def index_bits(m: int) -> int:
    """Bits per position inside a group of ``m`` (2 for M=4, 3 for M=8)."""
    return max(1, (m - 1).bit_length())


# ------------------------------------------------------------------------------------------------- encodings
def encode_bitmask(tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Kept (non-zero) values of ``tensor`` in row-major order and its packed non-zero bitmask."""
    flat = tensor.detach().reshape(-1)
    kept = flat != 0
    return {"values": flat[kept].contiguous(), "mask": pack_codes(kept, 1)}


def decode_bitmask(values: torch.Tensor, mask: torch.Tensor, shape) -> torch.Tensor:
    numel = math.prod(shape)
    if values.dim() != 1:
        raise CompactFormatError(f"the kept values must be 1-D, got shape {tuple(values.shape)}.")
    dense = torch.zeros(numel, dtype=values.dtype)
    used = 0
    for start in range(0, numel, CHUNK):
        kept = unpack_codes(mask, 1, numel, start, start + CHUNK).bool()
        count = int(kept.sum())
        if used + count <= values.numel():
            # masked_scatter_ fills in place without the int64 index tensor that ``[kept] =`` builds
            dense[start : start + kept.numel()].masked_scatter_(kept, values[used : used + count])
        used += count
    if used != values.numel():
        raise CompactFormatError(f"the bitmask keeps {used} weights but {values.numel()} values are stored.")
    return dense.view(*shape)


def encode_nm(matrix: torch.Tensor, n: int, m: int) -> Optional[Dict[str, torch.Tensor]]:
    """``n`` value slots per group of ``m`` consecutive inputs of ``matrix`` ([out, in]) and their positions.

    Returns ``None`` when some group holds more than ``n`` non-zeros (the layer is not ``n:m``). Slots of groups
    with fewer non-zeros are filled with zero-valued positions; positions are ascending within a group.
    """
    rows, cols = matrix.shape
    if cols % m or not 0 < n <= m:
        return None
    groups = matrix.detach().reshape(rows, cols // m, m)
    nonzero = groups != 0
    if int(nonzero.sum(dim=2).max()) > n:
        return None
    # non-zeros first (stable: in input order), then zeros as filler; keep n and sort the positions
    order = torch.argsort((~nonzero).to(torch.uint8), dim=2, stable=True)[..., :n]
    positions = order.sort(dim=2).values
    values = groups.gather(2, positions)
    return {"values": values.reshape(-1).contiguous(), "index": pack_codes(positions.reshape(-1), index_bits(m))}


def decode_nm(values: torch.Tensor, index: torch.Tensor, rows: int, cols: int, n: int, m: int) -> torch.Tensor:
    if m <= 0 or not 0 < n <= m or cols % m:
        raise CompactFormatError(f"invalid N:M encoding {n}:{m} for a [{rows}, {cols}] matrix.")
    groups = cols // m
    slots = rows * groups * n
    if values.dim() != 1 or values.numel() != slots:
        raise CompactFormatError(f"{n}:{m} over [{rows}, {cols}] needs {slots} values, {values.numel()} are stored.")
    bits = index_bits(m)
    if index.numel() != math.ceil(slots * bits / 8):
        raise CompactFormatError(f"{n}:{m} over [{rows}, {cols}] needs {math.ceil(slots * bits / 8)} index bytes.")
    dense = torch.zeros(rows, groups, m, dtype=values.dtype)
    per_row = groups * n
    step = max(1, CHUNK // max(per_row, 1)) * 8  # rows per chunk; keeps code offsets multiples of 8
    for row in range(0, rows, step):
        end = min(rows, row + step)
        positions = unpack_codes(index, bits, slots, row * per_row, end * per_row).long().view(end - row, groups, n)
        if n > 1 and not bool((positions[..., 1:] > positions[..., :-1]).all()):
            raise CompactFormatError("N:M positions must be strictly ascending within every group.")
        if int(positions.max()) >= m:
            raise CompactFormatError(f"an N:M position is >= M={m}.")
        dense[row:end].scatter_(2, positions, values[row * per_row : end * per_row].view(end - row, groups, n))
    return dense.view(rows, cols)


# ------------------------------------------------------------------------------------------------ deflate
def _byte_planes(block: torch.Tensor) -> torch.Tensor:
    """``[element_size, n]`` uint8: byte ``i`` of every element in row ``i`` (machine byte order)."""
    return block.contiguous().view(torch.uint8).view(-1, block.element_size()).t()


def deflate(tensor: torch.Tensor, level: int = DEFLATE_LEVEL):
    """A 1-D tensor -> (``uint8`` concatenated zlib streams, their sizes): one stream per byte plane of every
    :data:`DEFLATE_BLOCK` elements. Splitting bytes by plane is what makes floats compress: the plane holding
    sign and exponent is highly repetitive, the low mantissa bytes are nearly random."""
    tensor = tensor.reshape(-1)
    streams = []
    for start in range(0, tensor.numel(), DEFLATE_BLOCK):
        for plane in _byte_planes(tensor[start : start + DEFLATE_BLOCK]):
            streams.append(zlib.compress(plane.contiguous().numpy().tobytes(), level))
    joined = bytearray(b"".join(streams))
    data = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    return data, [len(stream) for stream in streams]


def inflate(data: torch.Tensor, sizes, dtype: torch.dtype, count: int) -> torch.Tensor:
    """Inverse of :func:`deflate`: ``count`` elements of ``dtype``."""
    out = torch.empty(count, dtype=dtype)
    size = out.element_size()
    blocks = -(-count // DEFLATE_BLOCK)
    if len(sizes) != blocks * size:
        raise CompactFormatError(f"expected {blocks * size} deflate streams for {count} elements, found {len(sizes)}.")
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != sum(sizes):
        raise CompactFormatError(f"the deflated data must be {sum(sizes)} uint8 bytes, found {data.dtype} "
                                 f"{tuple(data.shape)}.")
    raw = data.numpy()
    offset = 0
    for block in range(blocks):
        planes = _byte_planes(out[block * DEFLATE_BLOCK : (block + 1) * DEFLATE_BLOCK])
        for plane in range(size):
            length, expected = sizes[block * size + plane], planes.shape[1]
            stream = zlib.decompressobj()
            try:  # bounded output: a forged stream cannot expand beyond its slot (checkpoints come from the Hub)
                chunk = stream.decompress(raw[offset : offset + length], expected)
            except zlib.error as error:
                raise CompactFormatError(f"a deflate stream is corrupted: {error}") from None
            if len(chunk) != expected or not stream.eof:
                raise CompactFormatError(f"a deflate stream does not hold exactly {expected} bytes.")
            planes[plane] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
            offset += length
    return out


def _deflate_group(out: Dict[str, torch.Tensor], aux_key: str) -> None:
    """Replace the values and ``aux_key`` tensor of an encoded layer by deflate streams (in place)."""
    values, aux = out["weight"], out[aux_key]
    if values.dtype not in _DTYPE_CODES:
        return
    value_data, value_sizes = deflate(values)
    aux_data, aux_sizes = deflate(aux)
    out["weight"] = torch.cat([value_data, aux_data])  # one stored tensor: the mask/indices follow the values
    del out[aux_key]
    out["weight" + ZSIZES_SUFFIX] = torch.tensor(
        [DEFLATE_BLOCK, values.numel(), *value_sizes, aux.numel(), *aux_sizes], dtype=torch.int64
    )
    meta = out["weight" + META_SUFFIX]
    out["weight" + META_SUFFIX] = torch.cat([meta, torch.tensor([DEFLATE, _DTYPE_CODES[values.dtype]])])


def _inflate_group(tensors: Dict[str, torch.Tensor], aux_key: str, codec: int, dtype_code: int
                   ) -> Dict[str, torch.Tensor]:
    """The group with its values and ``aux_key`` tensor inflated back (inverse of :func:`_deflate_group`)."""
    if codec != DEFLATE:
        raise CompactFormatError(f"unknown codec {codec}; this optimum-msp knows deflate ({DEFLATE}).")
    if dtype_code not in _DTYPES:
        raise CompactFormatError(f"unknown value dtype code {dtype_code}.")
    zsizes = tensors.get("weight" + ZSIZES_SUFFIX)
    if zsizes is None or zsizes.dtype != torch.int64 or zsizes.dim() != 1 or zsizes.numel() < 3:
        raise CompactFormatError("'weight_msp_zsizes' (int64 stream sizes) is missing or malformed.")
    header = zsizes.tolist()
    if min(header) < 0:
        raise CompactFormatError("'weight_msp_zsizes' holds negative sizes.")
    if header[0] != DEFLATE_BLOCK:
        raise CompactFormatError(f"unsupported deflate block {header[0]} (this optimum-msp writes {DEFLATE_BLOCK}).")
    dtype = _DTYPES[dtype_code]
    count = header[1]
    value_streams = -(-count // DEFLATE_BLOCK) * torch.empty(0, dtype=dtype).element_size()
    value_sizes = header[2 : 2 + value_streams]
    rest = header[2 + value_streams :]
    if not rest:
        raise CompactFormatError("'weight_msp_zsizes' ends before the mask/index streams.")
    aux_sizes = rest[1:]
    data = tensors["weight"]
    split = sum(value_sizes)
    if data.dtype != torch.uint8 or data.numel() < split:
        raise CompactFormatError("the deflated values are truncated.")
    out = dict(tensors)
    out["weight"] = inflate(data[:split], value_sizes, dtype, count)
    out[aux_key] = inflate(data[split:], aux_sizes, torch.uint8, rest[0])
    return out


# ------------------------------------------------------------------------------------------------ one layer
def encode_layer(weight: torch.Tensor, target: Optional[LayerTarget] = None, name: str = "",
                 codec: Optional[str] = None, transposed: bool = False) -> Optional[Dict[str, torch.Tensor]]:
    """The compact tensors replacing a stored ``weight`` (suffix -> tensor), or ``None`` when dense is smaller.

    ``transposed``: the tensor is stored ``[in, out]`` (GPT-2's ``Conv1D``), so N:M groups run along its rows'
    transpose. Keys: ``"weight"`` (kept values) plus ``"weight_msp_mask"`` or ``"weight_msp_index"``, and
    ``"weight_msp_meta"``; with ``codec="deflate"`` the values and mask/indices are deflated (see the module
    docstring) and ``"weight_msp_zsizes"`` is added. ``name`` only labels warnings.
    """
    weight = weight.detach()
    if weight.dim() != 2 or not weight.is_floating_point():
        return None
    dim0, dim1 = weight.shape
    size = weight.element_size()
    dense_bytes = weight.numel() * size
    nonzeros = int((weight != 0).sum())
    candidates = {BITMASK: nonzeros * size + math.ceil(weight.numel() / 8)}
    nm_encoded = None
    # positions are packed in at most 8 bits (M <= 256); a larger M is stored with a bitmask, which is smaller
    # there anyway (1 bit per weight against ceil(log2 M) bits per kept one)
    if target is not None and target.is_nm and target.n > 0 and index_bits(target.m) <= 8:
        nm_encoded = encode_nm(weight.t() if transposed else weight, target.n, target.m)
        if nm_encoded is None:
            logger.warning("Layer %r does not follow its %s target; storing it with a bitmask.", name,
                           target.describe())
        else:
            slots = nm_encoded["values"].numel()
            candidates[NM] = slots * size + nm_encoded["index"].numel()
    encoding = min(candidates, key=lambda e: (candidates[e], e != NM))  # ties: N:M
    if candidates[encoding] + 48 >= dense_bytes:
        return None
    n = m = 0
    if encoding == NM:
        n, m, encoded = target.n, target.m, nm_encoded
    else:
        encoded, transposed = encode_bitmask(weight), False
    meta = torch.tensor([encoding, dim0, dim1, n, m, int(transposed)], dtype=torch.int64)
    out = {"weight": encoded["values"], "weight" + META_SUFFIX: meta,
           _aux_key(encoding): encoded["mask" if encoding == BITMASK else "index"]}
    if codec == "deflate":
        _deflate_group(out, _aux_key(encoding))
    return out


def _aux_key(encoding: int) -> str:
    """The stored name of a layer's second tensor: its bitmask or its N:M indices."""
    return "weight" + (MASK_SUFFIX if encoding == BITMASK else INDEX_SUFFIX)


def decode_layer(tensors: Dict[str, torch.Tensor], expected_shape=None) -> torch.Tensor:
    """Rebuild the dense stored weight from the tensors written by :func:`encode_layer`, on the device the kept
    values came on (decoding itself runs on the host: bit unpacking and zlib are host work)."""
    values = tensors.get("weight")
    if values is not None and values.device.type != "cpu":
        device = values.device
        return decode_layer({key: tensor.cpu() for key, tensor in tensors.items()}, expected_shape).to(device)
    meta = tensors.get("weight" + META_SUFFIX)
    values = tensors.get("weight")
    if values is None:
        raise CompactFormatError("the kept values ('weight') are missing.")
    if meta is None or meta.dim() != 1 or meta.numel() not in (6, 8) or meta.dtype != torch.int64:
        raise CompactFormatError("'weight_msp_meta' must be an int64 tensor of 6 (or, deflated, 8) numbers.")
    encoding, dim0, dim1, n, m, transposed = (int(x) for x in meta.tolist()[:6])
    if encoding not in _ENCODINGS:
        raise CompactFormatError(f"unknown encoding {encoding}; this optimum-msp knows {sorted(_ENCODINGS)}.")
    if dim0 <= 0 or dim1 <= 0:
        raise CompactFormatError(f"invalid shape [{dim0}, {dim1}].")
    if expected_shape is not None and tuple(expected_shape) != (dim0, dim1):
        raise CompactFormatError(f"stored shape [{dim0}, {dim1}] does not match the model's {list(expected_shape)}.")
    if meta.numel() == 8:
        tensors = _inflate_group(tensors, _aux_key(encoding), *(int(x) for x in meta.tolist()[6:]))
        values = tensors["weight"]
    if encoding == BITMASK:
        mask = tensors.get("weight" + MASK_SUFFIX)
        if mask is None:
            raise CompactFormatError("the bitmask ('weight_msp_mask') is missing.")
        return decode_bitmask(values, mask, (dim0, dim1))
    index = tensors.get("weight" + INDEX_SUFFIX)
    if index is None:
        raise CompactFormatError("the N:M indices ('weight_msp_index') are missing.")
    rows, cols = (dim1, dim0) if transposed else (dim0, dim1)
    matrix = decode_nm(values, index, rows, cols, n, m)
    return matrix.t().contiguous() if transposed else matrix


