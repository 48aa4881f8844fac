// SPDX-License-Identifier: Apache-2.0
// Fragment, no include guard: the prefill kernels of one SIMD level, included by
// dms/cpu/prefill_kernel.hpp into each level's namespace and target region, after that level's
// primitives (simd/ops.inl). See prefill_kernel.hpp for what they compute.

/// Keys per block of the tiles (a multiple of 2 * width at every level).
inline constexpr int prefill_key_block = 64;

/// Per-thread scratch of the tile kernels (grown, never shrunk).
struct prefill_scratch {
  std::vector<float> q, o, s, kt, vb, key, m, l, corr;
};
inline prefill_scratch& thread_prefill_scratch() {
  thread_local prefill_scratch s;
  return s;
}

/// S[r][j] = sum_c Q[r][c] Kt[c][j] for rows r < rows (a multiple of 4) and the block's 64 keys:
/// a 4-row x 2-vector register tile, one broadcast of Q per row and channel.
DMS_CPU_INLINE void tile_logits(const float* DMS_CPU_RESTRICT q, int ldq,
                                const float* DMS_CPU_RESTRICT kt, int d, int rows,
                                float* DMS_CPU_RESTRICT s) {
  constexpr int kb = prefill_key_block, cw = 2 * width;
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const float* q0 = q + std::size_t(r0) * ldq;
    const float* q1 = q0 + ldq;
    const float* q2 = q1 + ldq;
    const float* q3 = q2 + ldq;
    for (int j0 = 0; j0 < kb; j0 += cw) {
      vf a0 = zero(), b0 = zero(), a1 = zero(), b1 = zero();
      vf a2 = zero(), b2 = zero(), a3 = zero(), b3 = zero();
      for (int c = 0; c < d; ++c) {
        const vf k0 = load(kt + std::size_t(c) * kb + j0);
        const vf k1 = load(kt + std::size_t(c) * kb + j0 + width);
        vf x = set1(q0[c]);
        a0 = madd(x, k0, a0);
        b0 = madd(x, k1, b0);
        x = set1(q1[c]);
        a1 = madd(x, k0, a1);
        b1 = madd(x, k1, b1);
        x = set1(q2[c]);
        a2 = madd(x, k0, a2);
        b2 = madd(x, k1, b2);
        x = set1(q3[c]);
        a3 = madd(x, k0, a3);
        b3 = madd(x, k1, b3);
      }
      float* s0 = s + std::size_t(r0) * kb + j0;
      store(s0, a0);
      store(s0 + width, b0);
      store(s0 + kb, a1);
      store(s0 + kb + width, b1);
      store(s0 + 2 * kb, a2);
      store(s0 + 2 * kb + width, b2);
      store(s0 + 3 * kb, a3);
      store(s0 + 3 * kb + width, b3);
    }
  }
}

/// O[r] = O[r] * corr[r] + sum_{j < n} P[r][j] V[j] for rows r < rows (a multiple of 4), over
/// dpad channels (a multiple of 2 * width; V's padding channels are zero).
DMS_CPU_INLINE void tile_values(const float* DMS_CPU_RESTRICT p, const float* DMS_CPU_RESTRICT vb,
                                int dpad, int n, int rows, const float* DMS_CPU_RESTRICT corr,
                                float* DMS_CPU_RESTRICT o) {
  constexpr int kb = prefill_key_block, cw = 2 * width;
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const float* p0 = p + std::size_t(r0) * kb;
    for (int c0 = 0; c0 < dpad; c0 += cw) {
      float* o0 = o + std::size_t(r0) * dpad + c0;
      vf a[4], b[4];
      DMS_CPU_UNROLL
      for (int rr = 0; rr < 4; ++rr) {
        const vf f = set1(corr[r0 + rr]);
        a[rr] = load(o0 + std::size_t(rr) * dpad) * f;
        b[rr] = load(o0 + std::size_t(rr) * dpad + width) * f;
      }
      for (int j = 0; j < n; ++j) {
        const vf v0 = load(vb + std::size_t(j) * dpad + c0);
        const vf v1 = load(vb + std::size_t(j) * dpad + c0 + width);
        DMS_CPU_UNROLL
        for (int rr = 0; rr < 4; ++rr) {
          const vf x = set1(p0[std::size_t(rr) * kb + j]);
          a[rr] = madd(x, v0, a[rr]);
          b[rr] = madd(x, v1, b[rr]);
        }
      }
      DMS_CPU_UNROLL
      for (int rr = 0; rr < 4; ++rr) {
        store(o0 + std::size_t(rr) * dpad, a[rr]);
        store(o0 + std::size_t(rr) * dpad + width, b[rr]);
      }
    }
  }
}

/// Widens key block `blk` into kt ([d][64], transposed, zero past the last key) and, if vb is
/// given, its values into vb ([64][dpad], channels past d and keys past the last one zero).
/// Returns the number of keys in the block.
template <class T>
DMS_CPU_INLINE int load_key_block(const ::dms::cpu::detail::prefill_keys<T>& keys, int blk, int d,
                                  int dpad, float* DMS_CPU_RESTRICT kt, float* DMS_CPU_RESTRICT vb,
                                  float* DMS_CPU_RESTRICT key) {
  constexpr int kb = prefill_key_block;
  const int first = blk * kb;
  const int n = std::min(kb, keys.count - first);
  for (int j = 0; j < n; ++j) {
    widen(keys.k[first + j], d, key);
    for (int c = 0; c < d; ++c) kt[std::size_t(c) * kb + j] = key[c];
    if (vb) widen(keys.v[first + j], d, vb + std::size_t(j) * dpad);
  }
  if (n < kb) {
    for (int c = 0; c < d; ++c)
      std::fill(kt + std::size_t(c) * kb + n, kt + std::size_t(c + 1) * kb, 0.0f);
    if (vb) std::fill(vb + std::size_t(n) * dpad, vb + std::size_t(kb) * dpad, 0.0f);
  }
  return n;
}

/// Copies queries [i0, i1) of the group (rows r = (i - i0) * G + g), scaled, into q
/// ([rows_pad][dpad], zero padded).
template <class Args>
DMS_CPU_INLINE void load_query_tile(const Args& a, int i0, int i1, int rows_pad, float* q) {
  const int d = a.head_dim, G = a.group;
  std::fill(q, q + std::size_t(rows_pad) * a.dpad, 0.0f);
  for (int i = i0; i < i1; ++i)
    for (int g = 0; g < G; ++g) {
      const float* src = a.q + std::size_t(i) * a.q_stride + std::size_t(g) * d;
      float* dst = q + (std::size_t(i - i0) * G + g) * a.dpad;
      for (int c = 0; c < d; ++c) dst[c] = src[c] * a.scale;
    }
}

/// Flash attention of queries [first_query, end_query) of one row's group (QB queries x G heads
/// = one tile) over the row's keys, block by block, with the causal + DMS visibility rule; writes
/// out and lse of those queries.
template <class T>
void prefill_tile(const ::dms::cpu::detail::prefill_tile_args<T>& a) noexcept {
  constexpr int kb = prefill_key_block;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const auto& keys = a.keys;
  const int d = a.head_dim, dpad = a.dpad, G = a.group;
  const int i0 = a.first_query, i1 = a.end_query;
  const int rows = (i1 - i0) * G, rows_pad = (rows + 3) / 4 * 4;
  const std::int32_t tmin = a.t0 + i0, tmax = a.t0 + i1 - 1;

  prefill_scratch& sc = thread_prefill_scratch();
  sc.q.resize(std::size_t(rows_pad) * dpad);
  sc.o.assign(std::size_t(rows_pad) * dpad, 0.0f);
  sc.s.resize(std::size_t(rows_pad) * kb);
  sc.kt.resize(std::size_t(d) * kb);
  sc.vb.resize(std::size_t(kb) * dpad);
  sc.key.resize(std::size_t(dpad));
  sc.m.assign(std::size_t(rows_pad), neg_inf);
  sc.l.assign(std::size_t(rows_pad), 0.0f);
  sc.corr.assign(std::size_t(rows_pad), 1.0f);
  // Channels past d stay zero in every value row.
  for (int j = 0; j < kb; ++j)
    std::fill(sc.vb.data() + std::size_t(j) * dpad + d, sc.vb.data() + std::size_t(j + 1) * dpad,
              0.0f);
  load_query_tile(a, i0, i1, rows_pad, sc.q.data());

  // Causal: no key after the tile's last query.
  const int key_end = std::min(keys.count, a.causal_key_end);
  const int blocks = (key_end + kb - 1) / kb;
  for (int blk = 0; blk < blocks; ++blk) {
    if (keys.block_min_position[blk] > tmax || keys.block_max_deadline[blk] < tmin) continue;
    const bool all_visible = keys.block_max_position[blk] <= tmin &&
                             keys.block_min_deadline[blk] >= tmax && (blk + 1) * kb <= keys.count;
    const int n = load_key_block(keys, blk, d, dpad, sc.kt.data(), sc.vb.data(), sc.key.data());
    tile_logits(sc.q.data(), dpad, sc.kt.data(), d, rows_pad, sc.s.data());
    const std::int32_t* pos = keys.position + std::size_t(blk) * kb;
    const std::int32_t* dl = keys.deadline + std::size_t(blk) * kb;
    for (int r = 0; r < rows_pad; ++r) {
      float* srow = sc.s.data() + std::size_t(r) * kb;
      const std::int32_t t = r < rows ? a.t0 + i0 + r / G : tmin;
      if (!all_visible)
        for (int j = 0; j < kb; j += width)
          store(srow + j, select_within(load_i(pos + j), load_i(dl + j), set1_i(t), load(srow + j),
                                        set1(neg_inf)));
      vf mx = load(srow);
      for (int j = width; j < kb; j += width) mx = vmax(mx, load(srow + j));
      const float block_max = reduce_max(mx);
      const float m_old = sc.m[std::size_t(r)];
      const float m_new = block_max > m_old ? block_max : m_old;
      if (m_new == neg_inf) {  // nothing visible to this row yet
        sc.corr[std::size_t(r)] = 1.0f;
        std::fill(srow, srow + kb, 0.0f);
        continue;
      }
      const float corr = m_new > m_old ? std::exp(m_old - m_new) : 1.0f;
      const vf shift = set1(m_new);
      vf sum = zero();
      for (int j = 0; j < kb; j += width) {
        const vf e = exp(load(srow + j) - shift);
        store(srow + j, e);
        sum += e;
      }
      sc.l[std::size_t(r)] = sc.l[std::size_t(r)] * corr + reduce_add(sum);
      sc.m[std::size_t(r)] = m_new;
      sc.corr[std::size_t(r)] = corr;
    }
    tile_values(sc.s.data(), sc.vb.data(), dpad, n, rows_pad, sc.corr.data(), sc.o.data());
  }

  for (int r = 0; r < rows; ++r) {
    const int i = i0 + r / G, g = r % G;
    float* out = a.out + std::size_t(i) * a.out_stride + std::size_t(g) * d;
    const float l = sc.l[std::size_t(r)];
    const float inv = 1.0f / l;
    const float* o = sc.o.data() + std::size_t(r) * dpad;
    for (int c = 0; c < d; ++c) out[c] = o[c] * inv;
    a.lse[std::size_t(i) * G + g] = sc.m[std::size_t(r)] + std::log(l);
  }
}

/// The prompt scores of one key block: each key's probability under every query that folds
/// (policy.score_for_query), summed over the group, folded newest query first so that an
/// `assign` (TOVA) settles a key at once; the rows' lse come from prefill_tile.
template <class T>
void prefill_scores(const ::dms::cpu::detail::prefill_score_args<T>& a) noexcept {
  constexpr int kb = prefill_key_block;
  const auto& keys = a.keys;
  const int d = a.head_dim, dpad = a.dpad, G = a.group, qb = a.queries_per_tile;
  const int blk = a.block;
  const int first = blk * kb;

  prefill_scratch& sc = thread_prefill_scratch();
  const int rows_pad = (qb * G + 3) / 4 * 4;
  sc.q.resize(std::size_t(rows_pad) * dpad);
  sc.s.resize(std::size_t(rows_pad) * kb);
  sc.kt.resize(std::size_t(d) * kb);
  sc.key.resize(std::size_t(dpad));
  sc.o.resize(std::size_t(qb) * kb);  // the group-summed probabilities of a tile
  const int n = load_key_block(keys, blk, d, dpad, sc.kt.data(), nullptr, sc.key.data());
  const std::int32_t* pos = keys.position + first;
  const std::int32_t* dl = keys.deadline + first;

  bool done[kb] = {}, added[kb] = {};
  float add[kb] = {}, value[kb] = {};
  int open = n;
  const int tiles = (a.num_queries + qb - 1) / qb;
  for (int tile = tiles - 1; tile >= 0 && open > 0; --tile) {
    const int i0 = tile * qb, i1 = std::min(a.num_queries, i0 + qb);
    const std::int32_t tmin = a.t0 + i0, tmax = a.t0 + i1 - 1;
    if (keys.block_min_position[blk] > tmax) break;  // causal: older tiles see even less
    if (keys.block_max_deadline[blk] < tmin) continue;
    bool folds = false;
    for (int i = i0; i < i1; ++i) folds = folds || a.how[i] != 0;
    if (!folds) continue;
    const int rows = (i1 - i0) * G, rp = (rows + 3) / 4 * 4;
    load_query_tile(a, i0, i1, rp, sc.q.data());
    tile_logits(sc.q.data(), dpad, sc.kt.data(), d, rp, sc.s.data());
    // p[i][j] = sum_g exp(s - lse) for the tile's queries.
    for (int i = i0; i < i1; ++i) {
      float* pi = sc.o.data() + std::size_t(i - i0) * kb;
      for (int j = 0; j < kb; j += width) {
        vf sum = zero();
        for (int g = 0; g < G; ++g)
          sum += exp(load(sc.s.data() + (std::size_t(i - i0) * G + g) * kb + j) -
                     set1(a.lse[std::size_t(i) * G + g]));
        store(pi + j, sum);
      }
    }
    for (int i = i1 - 1; i >= i0 && open > 0; --i) {
      const std::uint8_t how = a.how[i];
      if (how == 0) continue;
      const std::int32_t t = a.t0 + i;
      const float* pi = sc.o.data() + std::size_t(i - i0) * kb;
      for (int j = 0; j < n; ++j) {
        if (done[j] || pos[j] > t || t > dl[j]) continue;
        if (how == 1) {  // score_update::add
          add[j] += pi[j];
          added[j] = true;
        } else {  // score_update::assign: what the earlier queries did is overwritten
          value[j] = pi[j] + add[j];
          done[j] = true;
          --open;
        }
      }
    }
  }
  for (int j = 0; j < n; ++j) {
    float* target = a.target[first + j];
    if (done[j]) {
      *target = value[j];
    } else if (added[j]) {
      *target += add[j];
    }
  }
}
