"""Train a tiny model with a deformable convolution in JAX: a jit-compiled step
(``jax.value_and_grad`` and a plain SGD update) on random data, printing the loss.

The model: a plain 3x3 convolution predicts the offsets (zero-initialised, so training starts as
an ordinary convolution), ``cudeform.jax.deform_conv2d`` samples with them, and a global average
pool and a linear layer regress a random target. Runs in seconds on a CPU; on a CUDA GPU the
deformable op runs the CUDA kernels on XLA's stream (see ``cudeform.jax``).

    python examples/jax_example.py [--steps 20]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

import cudeform.jax as cj


def init_params(key, c_in=2, c_out=8, k=3):
    k1, k2 = jax.random.split(key)
    return {
        "offset_w": jnp.zeros((2 * k * k, c_in, k, k), jnp.float32),  # zero: starts as a plain conv
        "offset_b": jnp.zeros((2 * k * k,), jnp.float32),
        "w": jax.random.normal(k1, (c_out, c_in, k, k), jnp.float32) / math.sqrt(c_in * k * k),
        "b": jnp.zeros((c_out,), jnp.float32),
        "head": jax.random.normal(k2, (c_out, 1), jnp.float32) / math.sqrt(c_out),
    }


def model(params, x):
    offset = jax.lax.conv_general_dilated(x, params["offset_w"], (1, 1), "SAME") + params["offset_b"][:, None, None]
    y = jax.nn.relu(cj.deform_conv2d(x, offset, params["w"], params["b"], padding=1))
    return y.mean(axis=(2, 3)) @ params["head"]


def loss_fn(params, x, target):
    return jnp.mean((model(params, x)[:, 0] - target) ** 2)


@jax.jit
def train_step(params, x, target, lr=0.1):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss


def main(steps: int = 20, seed: int = 0) -> list[float]:
    key_params, key_x, key_t = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = init_params(key_params)
    x = jax.random.normal(key_x, (8, 2, 12, 12), jnp.float32)
    target = jax.random.normal(key_t, (8,), jnp.float32)
    losses = []
    for step in range(steps):
        params, loss = train_step(params, x, target)
        losses.append(float(loss))
        print(f"step {step + 1:3d}/{steps}  loss {losses[-1]:.4f}", flush=True)
    offsets = jnp.abs(params["offset_w"]).max()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; the offset branch moved (max |weight| {float(offsets):.2e})")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
