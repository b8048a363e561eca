"""The 2-D sinusoidal positional code that conditions every flow (docs/design.md section 3)."""

import jax.numpy as jnp


def positional_encoding(height: int, width: int, condition_dim: int = 128) -> jnp.ndarray:
  """Returns the condition map, (height, width, condition_dim).

  The first half encodes the column x, the second half the row y, each as interleaved sin/cos pairs at
  frequencies w_k = 10000^(-2k/D), D = condition_dim / 2. Positions are integer indices at the layer's own
  resolution, so each tapped layer has its own code.
  """
  half = condition_dim // 2
  freqs = jnp.exp(jnp.arange(0, half, 2, dtype=jnp.float32) * -(jnp.log(10000.0) / half))  # (D/2,)
  x = jnp.arange(width, dtype=jnp.float32)[:, None] * freqs  # (W, D/2)
  y = jnp.arange(height, dtype=jnp.float32)[:, None] * freqs  # (H, D/2)
  code_x = jnp.stack([jnp.sin(x), jnp.cos(x)], axis=-1).reshape(width, half)  # [2k]=sin, [2k+1]=cos
  code_y = jnp.stack([jnp.sin(y), jnp.cos(y)], axis=-1).reshape(height, half)
  return jnp.concatenate([
      jnp.broadcast_to(code_x[None, :, :], (height, width, half)),
      jnp.broadcast_to(code_y[:, None, :], (height, width, half)),
  ], axis=-1)
