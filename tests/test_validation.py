"""Every check on the arguments of every public function, as one table: for each row and each
function it names, the call raises the row's exception with a message that reads
``function: argument: expected ..., got ...`` and quotes the value received.

docs/validation.md lists the same rows, with the message of the row's first function as its
example: test_docs_list_every_row keeps the two tables equal, and each row's test compares
its example with the message raised (GPU rows on a GPU). Rows marked gpu need CuPy and a
CUDA device; the two-device rows skip with fewer than two.
"""

import functools
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Union

import numpy as np
import pytest

import cudeform
from cudeform import _arrays
from cudeform.cuda import _compile
from cudeform.testing import gradcheck
from helpers import rel_err
from test_arrays import DLPackOnly
from test_deform_roi_pool import OPS, case, on, output_shape

DOCS = Path(__file__).resolve().parent.parent / "docs" / "validation.md"

FUNCTIONS = {f.__name__: f for f in (
    cudeform.deform_conv2d, cudeform.deform_conv2d_backward,
    cudeform.deform_kernel_conv2d, cudeform.deform_kernel_conv2d_backward,
    cudeform.deform_roi_pool, cudeform.deform_roi_pool_backward,
    cudeform.deform_psroi_pool, cudeform.deform_psroi_pool_backward,
    gradcheck,
)}


def expand(functions: str) -> list:
    """The functions a row's label names: "every op" (the eight ops), "every backward", or a
    comma-separated list in which ``name[_backward]`` stands for an op and its backward."""
    ops = [name for name in FUNCTIONS if name != "gradcheck"]
    if functions == "every op":
        return ops
    if functions == "every backward":
        return [name for name in ops if name.endswith("_backward")]
    names = []
    for label in functions.split(", "):
        base = label.removesuffix("[_backward]")
        names += [base, base + "_backward"] if base != label else [label]
    return names


def valid(function: str) -> dict:
    """Valid keyword arguments of ``function``: every check runs before any computation, so
    zeros do."""
    z = np.zeros
    if function.startswith("deform_conv2d"):
        args = dict(input=z((1, 4, 5, 6)), offset=z((1, 36, 5, 6)), weight=z((6, 2, 3, 3)), bias=z(6),
                    mask=z((1, 18, 5, 6)), padding=1)
        grad_output = (1, 6, 5, 6)
    elif function.startswith("deform_kernel_conv2d"):
        args = dict(input=z((1, 4, 5, 6)), weight=z((6, 2, 4, 4)), kernel_offset=z((1, 18, 5, 6)), bias=z(6),
                    kernel_size=3, padding=1, groups=2)
        grad_output = (1, 6, 5, 6)
    elif function.startswith("deform_roi_pool"):
        args = dict(input=z((2, 3, 7, 9)), rois=z((4, 5)), offset=z((4, 2, 3, 2)), mask=z((4, 1, 3, 2)),
                    output_size=(3, 2), spatial_scale=0.5)
        grad_output = (4, 3, 3, 2)
    elif function.startswith("deform_psroi_pool"):
        args = dict(input=z((2, 36, 7, 9)), rois=z((4, 5)), offset=z((4, 4, 2, 2)), output_dim=4, pooled_size=3,
                    group_size=3, part_size=2, sample_per_part=2)
        grad_output = (4, 4, 3, 3)
    else:
        return dict(forward=cudeform.deform_conv2d, backward=cudeform.deform_conv2d_backward,
                    inputs=dict(input=z((1, 2, 4, 5)), offset=z((1, 18, 2, 3)), weight=z((3, 2, 3, 3))))
    if function.endswith("_backward"):
        args = dict(grad_output=z(grad_output), **args)
    return args


Change = Callable[[dict], dict]


class Row(NamedTuple):
    functions: str  # a label for expand()
    argument: str  # as the message names it
    condition: str
    error: type
    change: Change  # valid keyword arguments -> the bad ones
    received: Union[str, Callable[[dict], str]]  # what the message quotes, or how to find it in the bad arguments
    gpu: bool = False
    patch: Callable = None  # called with monkeypatch before the call


def put(**values) -> Change:
    return lambda a: dict(a, **values)


def edit(name: str, f: Callable) -> Change:
    return lambda a: dict(a, **{name: f(a[name])})


def shape(name: str) -> Callable[[dict], str]:
    return lambda a: str(tuple(a[name].shape))


def batch_index(value: float) -> Change:
    def change(a):
        rois = a["rois"].copy()
        rois[1, 0] = value
        return dict(a, rois=rois)
    return change


def on_cuda(name: str = None) -> Change:
    """Every array on a fake CUDA device (a DLPack object that says it is on cuda:0), or only
    ``name``'s."""
    return lambda a: {k: DLPackOnly(v, device=(2, 0)) if isinstance(v, np.ndarray) and name in (None, k) else v
                      for k, v in a.items()}


def bfloat16_tensor(a):
    torch = pytest.importorskip("torch")
    return dict(a, input=torch.from_numpy(a["input"]).to(torch.bfloat16))


def without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    fresh_cache(monkeypatch)


def cupy_without_cuda(monkeypatch):
    cupy = pytest.importorskip("cupy")

    def no_driver():
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_driver)
    fresh_cache(monkeypatch)


def fresh_cache(monkeypatch):
    """_cuda_unavailable asks once per process: give this test its own answer."""
    monkeypatch.setattr(_arrays, "_cuda_unavailable", functools.lru_cache(_arrays._cuda_unavailable.__wrapped__))


def debug_mode(monkeypatch):
    monkeypatch.setattr(_compile, "_debug", True)


def on_gpu(a, device=0):
    """The arrays of ``a`` as CuPy arrays on ``device``."""
    import cupy

    with cupy.cuda.Device(device):
        return {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in a.items()}


def only_on_gpu(name: str) -> Change:
    return lambda a: dict(a, **{name: on_gpu(a)[name]})


def on_second_gpu(name: str) -> Change:
    def change(a):
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 2:
            pytest.skip("needs two CUDA devices")
        return dict(on_gpu(a), **{name: on_gpu(a, device=1)[name]})
    return change


def gpu_rois_in_debug_mode(a):
    return on_gpu(batch_index(2.0)(a))


def no_gradient(a):
    return dict(a, forward=lambda **kw: kw["input"], backward=lambda grad_output, **kw: {}, wrt=["input"])


CONVS = "deform_conv2d[_backward], deform_kernel_conv2d[_backward]"
CONV = "deform_conv2d[_backward]"
DK = "deform_kernel_conv2d[_backward]"
POOLS = "deform_roi_pool[_backward], deform_psroi_pool[_backward]"
ROI = "deform_roi_pool[_backward]"
PSROI = "deform_psroi_pool[_backward]"
NO_CUPY = "on a CUDA device, CuPy not installed"

ROWS = [
    # Arrays: presence, type, dtype, device (every op goes through _arrays.prepare).
    Row("every op", "input", "`None`", TypeError, put(input=None), "None"),
    Row("every op", "input", "a list", TypeError, edit("input", np.ndarray.tolist), "list"),
    Row("every op", "input", "an integer dtype", TypeError, edit("input", lambda x: x.astype(np.int64)), "int64"),
    Row("every op", "input", "a complex dtype", TypeError, edit("input", lambda x: x.astype(np.complex128)),
        "complex128"),
    Row("every op", "input", "float16 on the CPU", TypeError, edit("input", lambda x: x.astype(np.float16)),
        "float16"),
    Row("every op", "input", "a bfloat16 PyTorch tensor on the CPU", TypeError, bfloat16_tensor, "bfloat16"),
    Row("every op", "input", "on a device that is neither the CPU nor CUDA", ValueError,
        edit("input", lambda x: DLPackOnly(x, device=(8, 0))), "DLPack device type 8"),
    Row("every op", "input", NO_CUPY, ValueError, on_cuda(), "on cuda:0", patch=without_cupy),
    Row("every op", "input", "on a CUDA device, CuPy unable to use CUDA", ValueError, on_cuda(), "on cuda:0",
        patch=cupy_without_cuda),
    Row("every backward", "grad_output", "`None`", TypeError, put(grad_output=None), "None"),
    Row("every backward", "grad_output", "a dtype other than input's", TypeError,
        edit("grad_output", lambda x: x.astype(np.float32)), "float32"),
    Row(CONV, "offset", "a dtype other than input's", TypeError, edit("offset", lambda x: x.astype(np.float32)),
        "float32"),
    Row(DK, "kernel_offset", "a dtype other than input's", TypeError,
        edit("kernel_offset", lambda x: x.astype(np.float32)), "float32"),
    Row(POOLS, "rois", "a dtype other than input's", TypeError, edit("rois", lambda x: x.astype(np.float32)),
        "float32"),
    Row(CONV, "offset", "on another device than input", ValueError, on_cuda("offset"), "on cuda:0"),
    Row(DK, "kernel_offset", "on another device than input", ValueError, on_cuda("kernel_offset"), "on cuda:0"),
    Row(POOLS, "rois", "on another device than input", ValueError, on_cuda("rois"), "on cuda:0"),
    Row(CONV, "offset", "`None`", TypeError, put(offset=None), "None"),
    Row(CONVS, "weight", "`None`", TypeError, put(weight=None), "None"),
    Row(DK, "kernel_offset", "`None`", TypeError, put(kernel_offset=None), "None"),
    Row(POOLS, "rois", "`None`", TypeError, put(rois=None), "None"),
    Row(CONVS, "bias", "a list", TypeError, edit("bias", np.ndarray.tolist), "list"),
    Row(POOLS, "offset", "a list", TypeError, edit("offset", np.ndarray.tolist), "list"),
    # Shapes and sizes.
    Row("every op", "input", "not 4-D", ValueError, edit("input", lambda x: x[0]), shape("input")),
    Row("every backward", "grad_output", "not the output's shape", ValueError,
        edit("grad_output", lambda g: g[..., :-1]), shape("grad_output")),
    Row(CONVS, "weight", "not 4-D", ValueError, edit("weight", lambda w: w[0]), shape("weight")),
    Row(CONVS, "bias", "not `(C_out,)`", ValueError, edit("bias", lambda b: b[:5]), shape("bias")),
    Row(CONVS, "input", "smaller than the dilated kernel", ValueError, put(padding=0, dilation=4), "H, W = 5, 6"),
    Row(CONV, "input", "no channels", ValueError, edit("input", lambda x: x[:, :0]), shape("input")),
    Row(CONV, "weight", "empty", ValueError, edit("weight", lambda w: w[:0]), shape("weight")),
    Row(CONV, "weight", "`weight.shape[1]` does not divide C_in", ValueError, put(weight=np.zeros((6, 3, 3, 3))),
        shape("weight")),
    Row(CONV, "weight", "C_out not a multiple of groups", ValueError, put(weight=np.zeros((5, 2, 3, 3))),
        shape("weight")),
    Row(CONV, "offset", "not 4-D", ValueError, edit("offset", lambda o: o[0]), shape("offset")),
    Row(CONV, "offset", "channels not a multiple of `2 * kh * kw`", ValueError, edit("offset", lambda o: o[:, :35]),
        shape("offset")),
    Row(CONV, "offset", "offset groups do not divide C_in", ValueError,
        put(offset=np.zeros((1, 54, 5, 6)), mask=None), shape("offset")),
    Row(CONV, "offset", "spatial size not the output's", ValueError, edit("offset", lambda o: o[:, :, :4]),
        shape("offset")),
    Row(CONV, "offset", "batch size not input's", ValueError, edit("offset", lambda o: np.concatenate([o, o])),
        shape("offset")),
    Row(CONV, "mask", "channels not `offset_groups * kh * kw`", ValueError, edit("mask", lambda m: m[:, :9]),
        shape("mask")),
    Row(CONV, "mask", "spatial size not the output's", ValueError, edit("mask", lambda m: m[..., :5]),
        shape("mask")),
    Row(DK, "weight", "`weight.shape[1]` not `C_in / groups`", ValueError, put(weight=np.zeros((6, 1, 4, 4))),
        shape("weight")),
    Row(DK, "kernel_size", "larger than the weight's scope", ValueError, put(kernel_size=5), "(5, 5)"),
    Row(DK, "kernel_offset", "neither 2-D nor 4-D", ValueError, edit("kernel_offset", lambda o: o[..., 0]),
        shape("kernel_offset")),
    Row(DK, "kernel_offset", "channels not a multiple of `2 * kh * kw`", ValueError,
        edit("kernel_offset", lambda o: o[:, :17]), shape("kernel_offset")),
    Row(DK, "kernel_offset", "offset groups do not divide C_out", ValueError,
        put(kernel_offset=np.zeros((1, 72, 5, 6))), shape("kernel_offset")),
    Row(DK, "kernel_offset", "local DK: spatial size not the output's", ValueError,
        edit("kernel_offset", lambda o: o[:, :, :4]), shape("kernel_offset")),
    Row(DK, "kernel_offset", "global DK: batch size not input's", ValueError, put(kernel_offset=np.zeros((2, 18))),
        shape("kernel_offset")),
    Row(POOLS, "input", "an empty plane (H or W = 0)", ValueError, edit("input", lambda x: x[:, :, :0]),
        shape("input")),
    Row(POOLS, "rois", "not 2-D", ValueError, edit("rois", lambda r: r[0]), shape("rois")),
    Row(POOLS, "rois", "not 5 columns", ValueError, edit("rois", lambda r: r[:, :4]), shape("rois")),
    Row(POOLS, "rois", "batch index `>= N` (CPU)", ValueError, batch_index(2.0), "2.0 in row 1"),
    Row(POOLS, "rois", "batch index `< 0` (CPU)", ValueError, batch_index(-1.0), "-1.0 in row 1"),
    Row(POOLS, "rois", "batch index NaN (CPU)", ValueError, batch_index(np.nan), "nan in row 1"),
    Row(ROI, "offset", "not `(R, 2, ph, pw)`", ValueError, edit("offset", lambda o: o[..., :1]), shape("offset")),
    Row(ROI, "mask", "not `(R, 1, ph, pw)`", ValueError, edit("mask", lambda m: np.concatenate([m, m], axis=1)),
        shape("mask")),
    Row(PSROI, "input", "channels not `output_dim * group_size**2`", ValueError, edit("input", lambda x: x[:, 1:]),
        shape("input")),
    Row(PSROI, "offset", "not 4-D", ValueError, edit("offset", lambda o: o[0]), shape("offset")),
    Row(PSROI, "offset", "an odd number of channels", ValueError, edit("offset", lambda o: o[:, :3]),
        shape("offset")),
    Row(PSROI, "offset", "num_classes does not divide output_dim", ValueError, put(offset=np.zeros((4, 6, 2, 2))),
        shape("offset")),
    Row(PSROI, "offset", "spatial size not `(part_size, part_size)`", ValueError, put(part_size=3),
        shape("offset")),
    # Scalars.
    Row(CONVS, "stride", "0", ValueError, put(stride=0), "0"),
    Row(CONVS, "stride", "a float", TypeError, put(stride=1.5), "1.5"),
    Row(CONVS, "stride", "a bool", TypeError, put(stride=True), "True"),
    Row(CONVS, "stride", "three values", TypeError, put(stride=(1, 1, 1)), "(1, 1, 1)"),
    Row(CONVS, "padding", "negative", ValueError, put(padding=-1), "-1"),
    Row(CONVS, "dilation", "0", ValueError, put(dilation=(1, 0)), "(1, 0)"),
    Row(DK, "kernel_size", "0", ValueError, put(kernel_size=0), "0"),
    Row(DK, "kernel_size", "`None`", TypeError, put(kernel_size=None), "None"),
    Row(DK, "groups", "does not divide C_in", ValueError, put(groups=3), "3"),
    Row(DK, "groups", "0", ValueError, put(groups=0), "0"),
    Row(DK, "groups", "a float", TypeError, put(groups=2.0), "2.0"),
    Row(POOLS, "spatial_scale", "0", ValueError, put(spatial_scale=0.0), "0.0"),
    Row(POOLS, "spatial_scale", "NaN", ValueError, put(spatial_scale=float("nan")), "nan"),
    Row(POOLS, "spatial_scale", "a string", TypeError, put(spatial_scale="1"), "'1'"),
    Row(ROI, "output_size", "0", ValueError, put(output_size=(0, 2)), "(0, 2)"),
    Row(ROI, "output_size", "a float", TypeError, put(output_size=2.0), "2.0"),
    Row(ROI, "sampling_ratio", "negative", ValueError, put(sampling_ratio=-1), "-1"),
    Row(ROI, "sampling_ratio", "a float", TypeError, put(sampling_ratio=2.0), "2.0"),
    Row(ROI, "sampling_ratio", "a bool", TypeError, put(sampling_ratio=True), "True"),
    Row(ROI, "gamma", "infinite", ValueError, put(gamma=float("inf")), "inf"),
    Row(ROI, "gamma", "`None`", TypeError, put(gamma=None), "None"),
    Row(PSROI, "output_dim", "0", ValueError, put(output_dim=0), "0"),
    Row(PSROI, "pooled_size", "0", ValueError, put(pooled_size=0), "0"),
    Row(PSROI, "pooled_size", "a pair", TypeError, put(pooled_size=(3, 3)), "(3, 3)"),
    Row(PSROI, "group_size", "0", ValueError, put(group_size=0), "0"),
    Row(PSROI, "part_size", "0", ValueError, put(part_size=0), "0"),
    Row(PSROI, "sample_per_part", "0", ValueError, put(sample_per_part=0), "0"),
    Row(PSROI, "sample_per_part", "a float", TypeError, put(sample_per_part=2.5), "2.5"),
    Row(PSROI, "trans_std", "NaN", ValueError, put(trans_std=float("nan")), "nan"),
    # Flags of the backwards.
    Row("every backward", "deterministic", "not a bool", TypeError, put(deterministic=1), "1"),
    Row("deform_conv2d_backward", "border_grad", "not `\"torchvision\"` or `\"mmcv\"`", ValueError,
        put(border_grad="tf"), "'tf'"),
    # cudeform.testing.gradcheck.
    Row("gradcheck", "forward", "not callable", TypeError, put(forward=None), "None"),
    Row("gradcheck", "backward", "not callable", TypeError, put(backward="backward"), "'backward'"),
    Row("gradcheck", "inputs", "not a mapping", TypeError, lambda a: dict(a, inputs=list(a["inputs"].values())),
        "list"),
    Row("gradcheck", "inputs['weight']", "a list", TypeError,
        lambda a: dict(a, inputs=dict(a["inputs"], weight=a["inputs"]["weight"].tolist())), "list"),
    Row("gradcheck", "inputs['weight']", "not float64", TypeError,
        lambda a: dict(a, inputs=dict(a["inputs"], weight=a["inputs"]["weight"].astype(np.float32))), "float32"),
    Row("gradcheck", "kwargs", "not a mapping", TypeError, put(kwargs=[("padding", 1)]), "list"),
    Row("gradcheck", "wrt", "a string", TypeError, put(wrt="offset"), "'offset'"),
    Row("gradcheck", "wrt", "a name not in inputs", ValueError, put(wrt=["mask"]), "'mask'"),
    Row("gradcheck", "eps", "0", ValueError, put(eps=0.0), "0.0"),
    Row("gradcheck", "atol", "negative", ValueError, put(atol=-1e-7), "-1e-07"),
    Row("gradcheck", "rtol", "NaN", ValueError, put(rtol=float("nan")), "nan"),
    Row("gradcheck", "max_elements", "0", ValueError, put(max_elements=0), "0"),
    Row("gradcheck", "seed", "a float", TypeError, put(seed=0.5), "0.5"),
    Row("gradcheck", "raise_exception", "not a bool", TypeError, put(raise_exception="no"), "'no'"),
    Row("gradcheck", "forward's output", "not an array", TypeError, put(forward=lambda **kw: [0.0]), "list"),
    Row("gradcheck", "backward", "no gradient for a name in `wrt`", ValueError, no_gradient, "None"),
    # On the GPU.
    Row(CONV, "offset", "CuPy, input NumPy", ValueError, only_on_gpu("offset"), "on cuda:0", gpu=True),
    Row(DK, "kernel_offset", "CuPy, input NumPy", ValueError, only_on_gpu("kernel_offset"), "on cuda:0", gpu=True),
    Row(POOLS, "rois", "CuPy, input NumPy", ValueError, only_on_gpu("rois"), "on cuda:0", gpu=True),
    Row(CONV, "offset", "on another GPU than input", ValueError, on_second_gpu("offset"), "on cuda:1", gpu=True),
    Row(DK, "kernel_offset", "on another GPU than input", ValueError, on_second_gpu("kernel_offset"), "on cuda:1",
        gpu=True),
    Row(POOLS, "rois", "on another GPU than input", ValueError, on_second_gpu("rois"), "on cuda:1", gpu=True),
    Row(POOLS, "rois", "batch index `>= N` (GPU, debug mode)", ValueError, gpu_rois_in_debug_mode,
        "2.0 in row 1", gpu=True, patch=debug_mode),
]


@functools.lru_cache(maxsize=None)
def docs_table() -> list:
    """The rows of docs/validation.md's table: (functions, argument, condition, exception,
    example message), backticks around whole cells removed."""
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 5 or cells[0] in ("function(s)", "") or set(cells[0]) <= set("-: "):
            continue
        cells = [c.replace("\\|", "|") for c in cells]
        unquoted = [c[1:-1] if c.startswith("`") and c.endswith("`") and c.count("`") == 2 else c for c in cells]
        rows.append((unquoted[0], unquoted[1], cells[2], unquoted[3], unquoted[4]))
    return rows


def test_docs_list_every_row():
    documented = [row[:4] for row in docs_table()]
    tested = [(row.functions, row.argument, row.condition, row.error.__name__) for row in ROWS]
    assert documented == tested


def cases():
    for i, row in enumerate(ROWS):
        for function in expand(row.functions):
            yield pytest.param(i, function, id=f"{function}-{row.argument}-{row.condition}",
                               marks=[pytest.mark.gpu] if row.gpu else [])


@pytest.mark.parametrize("index,function", list(cases()))
def test_rejected(index, function, monkeypatch):
    row = ROWS[index]
    if row.patch is not None:
        row.patch(monkeypatch)
    bad = row.change(valid(function))
    received = row.received if isinstance(row.received, str) else row.received(bad)
    pattern = rf"^{re.escape(function)}: {re.escape(row.argument)}: expected .+, got .*{re.escape(received)}"
    with pytest.raises(row.error, match=pattern) as info:
        FUNCTIONS[function](**bad)
    if function == expand(row.functions)[0]:
        assert str(info.value) == docs_table()[index][4], "docs/validation.md's example is not the message"


# --------------------------------------------------------------------------------------------
# RoIs whose batch index is out of range, on the GPU
# --------------------------------------------------------------------------------------------

SPIN = r"""
extern "C" __global__ void spin(unsigned long long nanoseconds) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < nanoseconds);
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_out_of_range_batch_index_pools_zeros_without_synchronising(op):
    """Outside debug mode such a RoI pools zeros and gets zero gradients, the other RoIs are
    unaffected, and nothing waits for the device: the calls return while a kernel queued
    before them still runs."""
    import cupy

    forward, backward, ref_forward, ref_backward, call = OPS[op]
    args, geo = case(op, 25, ps="rfcn")
    bad = [0, 2, 3, 4]
    args["rois"][bad, 0] = [args["input"].shape[0], -1.0, np.nan, 1e9]
    good = np.setdiff1d(np.arange(args["rois"].shape[0]), bad)
    kept = {k: v if v is None or k == "input" else v[good] for k, v in args.items()}
    pos, kw = call(on(cupy, args))
    grad_out = np.random.default_rng(26).standard_normal((args["rois"].shape[0],) + output_shape(op, args, geo))
    grad_out_gpu = cupy.asarray(grad_out)
    spin = cupy.RawKernel(SPIN, "spin")
    spin((1,), (1,), (np.uint64(0),))
    forward(*pos, **kw, **geo)  # compiles the kernels and fills CuPy's memory pool: the calls
    backward(grad_out_gpu, *pos, **kw, **geo)  # below then need neither the compiler nor cudaMalloc
    spin((1,), (1,), (np.uint64(500_000_000),))
    out = forward(*pos, **kw, **geo)
    grads = backward(grad_out_gpu, *pos, **kw, **geo)
    assert not cupy.cuda.get_current_stream().done
    out = out.get()
    assert np.array_equal(out[bad], np.zeros_like(out[bad]))
    assert rel_err(out[good], ref_forward(*call(kept)[0], **call(kept)[1], **geo)) < 1e-12
    want = ref_backward(grad_out[good], *call(kept)[0], **call(kept)[1], **geo)
    assert rel_err(grads.input, want[0]) < 1e-10
    for field, got, w in zip(grads._fields[1:], grads[1:], want[1:]):
        got = got.get()
        assert np.array_equal(got[bad], np.zeros_like(got[bad])), field
        assert rel_err(got[good], w) < 1e-10, field


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_debug_mode_reads_batch_indices_in_the_half_types(torch, monkeypatch, op, dtype):
    """bfloat16 RoIs travel as their 16 bits: the debug check must read them as numbers."""
    forward, _, _, _, call = OPS[op]
    args, geo = case(op)
    args["rois"][:, 0] = 1.5  # batch index 1 of 2
    tensors = {k: None if v is None else torch.from_numpy(v).to("cuda", getattr(torch, dtype))
               for k, v in args.items()}
    debug_mode(monkeypatch)
    forward(*call(tensors)[0], **call(tensors)[1], **geo)
    tensors["rois"][3, 0] = 2.0
    with pytest.raises(ValueError, match=r": rois: expected batch indices .*\[0, 2\), got 2\.0 in row 3$"):
        forward(*call(tensors)[0], **call(tensors)[1], **geo)
