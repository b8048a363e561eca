"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, CVPR 2016).

Each 2x2 block of outputs comes from a 4x4 tile of inputs: the tile and the kernel are moved into the
transform domain, multiplied there elementwise (16 matmuls over channels, batched over tiles) and moved
back. That is 16 multiplications per output block and channel pair instead of 36: 2.25x fewer FLOPs, at
the price of transforms that only add, subtract and halve. On a CPU, where XLA's convolution is a direct
one, this pays where the channel count makes the matmuls dominate (`encoders.WINOGRAD_CHANNELS`,
`experiments/bench_conv.py`); GPU libraries pick such algorithms themselves. Agrees with the direct
convolution to about 2e-6 in float32.
"""

import jax.numpy as jnp


def _kernel_transform(g0, g1, g2):
  """G g along one kernel axis, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]."""
  return g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2


def _input_transform(d0, d1, d2, d3):
  """B^T d along one tile axis, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _output_transform(m0, m1, m2, m3):
  """A^T m along one tile axis, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
  return m0 + m1 + m2, m1 - m2 - m3


def conv3x3_valid(x, kernel, dtype=jnp.float32):
  """A stride-1 3x3 convolution without padding: x (B, H + 2, W + 2, C), kernel (3, 3, C, K) HWIO ->
  (B, H, W, K), float32. Pad x first (zeros or reflect) for a same-size output. `dtype`: the inputs of
  the transform-domain matmuls (bfloat16: rounded after the transforms, products summed in float32)."""
  b, hp, wp, c = x.shape
  h, w, k = hp - 2, wp - 2, kernel.shape[-1]
  # Odd outputs: one more row / column of zero input, cropped from the result.
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  th, tw = (h + 1) // 2, (w + 1) // 2  # tiles per column and row
  # U = G g G^T per channel pair, (16, C, K): first along the kernel's rows (gr[j][a]), then its columns.
  g = kernel.astype(jnp.float32)
  gr = [_kernel_transform(*(g[i, j] for i in range(3))) for j in range(3)]
  u = jnp.stack([t for a in range(4) for t in _kernel_transform(*(gr[j][a] for j in range(3)))])
  # V = B^T d B per tile, (16, tiles, C): d[i][j] holds the (i, j) element of every 4x4 tile (tiles overlap
  # by 2), (B, th, tw, C); transformed along the tiles' rows (dr[j][a]), then their columns (v[a][e]).
  d = [[x[:, i:i + 2 * th:2, j:j + 2 * tw:2, :] for j in range(4)] for i in range(4)]
  dr = [_input_transform(*(d[i][j] for i in range(4))) for j in range(4)]
  v = [_input_transform(*(dr[j][a] for j in range(4))) for a in range(4)]
  v = jnp.stack([v[a][e] for a in range(4) for e in range(4)]).reshape(16, b * th * tw, c)
  m = jnp.einsum("ntc,nck->ntk", v.astype(dtype), u.astype(dtype),
                 preferred_element_type=jnp.float32).reshape(4, 4, b, th, tw, k)
  # Y = A^T M A per tile, (B, th, 2, tw, 2, K): along the tiles' rows, then their columns.
  top, bottom = _output_transform(*(m[a] for a in range(4)))
  y = jnp.stack([jnp.stack(_output_transform(*(half[e] for e in range(4))), axis=3)
                 for half in (top, bottom)], axis=2)
  return y.reshape(b, 2 * th, 2 * tw, k)[:, :h, :w]
