"""cudeform.testing.gradcheck must catch a wrong gradient and say where it is (its argument
checks are in test_validation.py)."""

import numpy as np
import pytest

import cudeform
from cudeform.testing import GradcheckError, gradcheck, peak_extra_memory


def case():
    rng = np.random.default_rng(0)
    return dict(input=rng.standard_normal((1, 2, 4, 5)), offset=rng.uniform(-1.5, 1.5, (1, 18, 2, 3)),
                weight=rng.standard_normal((3, 2, 3, 3)))


def test_passes_on_a_correct_backward():
    result = gradcheck(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, case())
    assert result.ok and result.checked == {"input": 40, "offset": 108, "weight": 54}
    assert all(w.error <= 1.0 for w in result.worst.values())


def test_reports_the_wrong_element():
    def broken_backward(grad_output, **kw):
        grads = cudeform.deform_conv2d_backward(grad_output, **kw)
        bad = grads.weight.copy()
        bad[2, 1, 0, 2] += 1e-3
        return grads._replace(weight=bad)

    with pytest.raises(GradcheckError, match=r"weight: 54 elements, worst at \(2, 1, 0, 2\)"):
        gradcheck(cudeform.deform_conv2d, broken_backward, case())
    result = gradcheck(cudeform.deform_conv2d, broken_backward, case(), raise_exception=False)
    assert not result.ok and result.worst["weight"].index == (2, 1, 0, 2)
    assert result.worst["input"].error <= 1.0


def test_subset_and_wrt():
    result = gradcheck(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, case(), wrt=["offset"],
                       max_elements=10)
    assert list(result.checked) == ["offset"] and result.checked["offset"] == 10


def test_inputs_left_untouched():
    inputs = case()
    before = {k: v.copy() for k, v in inputs.items()}
    gradcheck(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, inputs, max_elements=5)
    for k in inputs:
        assert np.array_equal(inputs[k], before[k])


@pytest.mark.gpu
def test_peak_extra_memory_counts_the_workspace_not_the_result(torch):
    def fn():
        workspace = torch.empty(3 * 2**20, dtype=torch.uint8, device="cuda")
        result = torch.ones(2**20, dtype=torch.uint8, device="cuda")
        del workspace
        return result

    extra, result = peak_extra_memory(fn)
    assert extra == 3 * 2**20
    assert result.shape == (2**20,) and bool(result.all())
