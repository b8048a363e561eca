"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4 (Lavin & Gray, CVPR 2016).

Each m x m block of outputs comes from an (m + 2) x (m + 2) tile of inputs: the tile and the kernel are
moved into the transform domain, multiplied there elementwise ((m + 2)^2 matmuls over channels, batched
over tiles) and moved back. Per output and channel pair that is 4 multiplications instead of 9 for m = 2
and 2.25 for m = 4, at the price of transforms that only scale and add. On a CPU, where XLA's convolution
is a direct one, this pays where the matmuls dominate (`encoders.Conv`, `experiments/bench/conv.py`); GPU
libraries pick such algorithms themselves. Against the direct convolution in float32 the error is about
1e-6 of the output's largest value for m = 2 and 2e-5 for m = 4, whose transforms scale by up to 8.
"""

import jax.numpy as jnp
import numpy as np

# (G, B^T, A^T) of F(m x m, 3x3): U = G g G^T moves a kernel, V = B^T d B a tile, Y = A^T M A the product
# back. Interpolation points 0, 1, -1 (m = 2) and 0, 1, -1, 2, -2 (m = 4), each with the point at infinity.
_MATRICES = {
    2: (np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])),
}
OUTPUT_TILES = tuple(_MATRICES)


def _transform(matrix, items):
  """matrix @ items for a small constant matrix and a list of arrays: sums of the nonzero terms only, so
  that XLA fuses it into a few elementwise passes instead of a matmul that is mostly zeros."""
  out = []
  for row in matrix:
    terms = [(float(c), item) for c, item in zip(row, items) if c != 0]
    total = terms[0][0] * terms[0][1]
    for c, item in terms[1:]:
      total = total + item if c == 1 else total - item if c == -1 else total + c * item
    out.append(total)
  return out


def conv3x3_valid(x, kernel, dtype=jnp.float32, output_tile=2):
  """A stride-1 3x3 convolution without padding: x (B, H + 2, W + 2, C), kernel (3, 3, C, K) HWIO ->
  (B, H, W, K), float32. Pad x first (zeros or reflect) for a same-size output. `output_tile`: m of
  F(m x m, 3x3). `dtype`: the inputs of the transform-domain matmuls (bfloat16: rounded after the
  transforms, products summed in float32)."""
  g_matrix, bt_matrix, at_matrix = _MATRICES[output_tile]
  m, t = at_matrix.shape  # output block and input tile sizes
  b, hp, wp, c = x.shape
  h, w, k = hp - 2, wp - 2, kernel.shape[-1]
  # Outputs that do not fill a block: more rows / columns of zero input, cropped from the result.
  x = jnp.pad(x, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)))
  th, tw = -(-h // m), -(-w // m)  # tiles per column and row
  # U = G g G^T per channel pair, (t * t, C, K): first along the kernel's rows (gr[j][a]), then its columns.
  g = kernel.astype(jnp.float32)
  gr = [_transform(g_matrix, [g[i, j] for i in range(3)]) for j in range(3)]
  u = jnp.stack([q for a in range(t) for q in _transform(g_matrix, [gr[j][a] for j in range(3)])])
  # V = B^T d B per tile, (t * t, tiles, C): d[i][j] holds the (i, j) element of every tile (tiles overlap
  # by 2), (B, th, tw, C); transformed along the tiles' rows (dr[j][a]), then their columns (v[a][e]).
  d = [[x[:, i:i + m * th:m, j:j + m * tw:m, :] for j in range(t)] for i in range(t)]
  dr = [_transform(bt_matrix, [d[i][j] for i in range(t)]) for j in range(t)]
  v = [_transform(bt_matrix, [dr[j][a] for j in range(t)]) for a in range(t)]
  v = jnp.stack([v[a][e] for a in range(t) for e in range(t)]).reshape(t * t, b * th * tw, c)
  products = jnp.einsum("ntc,nck->ntk", v.astype(dtype), u.astype(dtype),
                        preferred_element_type=jnp.float32).reshape(t, t, b, th, tw, k)
  # Y = A^T M A per tile, (B, th, m, tw, m, K): along the tiles' rows, then their columns.
  rows = _transform(at_matrix, [products[a] for a in range(t)])
  y = jnp.stack([jnp.stack(_transform(at_matrix, [r[e] for e in range(t)]), axis=3) for r in rows], axis=2)
  return y.reshape(b, m * th, m * tw, k)[:, :h, :w]
