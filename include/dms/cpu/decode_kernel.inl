// SPDX-License-Identifier: Apache-2.0
// Fragment, no include guard: the decode kernel of one SIMD level, included by
// dms/cpu/decode_kernel.hpp into each level's namespace and target region, after that level's
// primitives (simd/ops.inl). See decode_kernel.hpp for what the kernel computes.

/// Keys per block: one page at the default page size; the logits of a block stay in registers
/// or L1 between the QK and PV passes.
inline constexpr int decode_block_keys = 16;

/// Prefetches one K or V row (null: nothing) into L2, ahead of its use. A row's pages are
/// scattered through the pool and the hardware prefetcher starts over at each, so the kernel
/// fetches the next block's rows itself, spread over the current block's arithmetic at the rate
/// it consumes rows: its keys during the QK pass, its values during the PV pass (without them
/// decode at 16K tokens takes up to 2x as long on Zen 3 and Zen 5: docs/performance/). Call it
/// directly, never from a lambda: GCC 12 deletes a lambda call whose body only prefetches (no
/// prefetch instruction was left in the compiled kernel; tests/codegen checks it).
template <class T>
DMS_CPU_INLINE void prefetch_row(const T* row, int d) {
  if (!row) return;
  const auto* bytes = reinterpret_cast<const char*>(row);
  const int n = d * int(sizeof(T));
  for (int off = 0; off < n; off += 64) DMS_CPU_PREFETCH(bytes + off);
}

/// s[g][j] = q_g . k_j for one block and GT heads (q already carries the softmax scale).
/// Keys go two at a time, so that each load of a query chunk feeds both keys: per chunk of
/// 2 * width channels, 2 key loads and 2 * GT query loads for 4 * GT FMAs (one key at a time
/// needs a query load per FMA, which saturates the load ports first). The accumulator chains
/// must be numerous enough to hide the FMA latency: with GT >= 4 the 2 * GT (key, head) ones
/// are; fewer heads keep the two halves of a chunk in separate accumulators. Each key's
/// accumulators are summed horizontally `width` keys at a time (transpose_sums).
template <class T, int GT>
DMS_CPU_INLINE void block_logits(const float* DMS_CPU_RESTRICT q, int dpad, int d,
                                 const T* const* kp, const T* const* next_k, int nb,
                                 float (*DMS_CPU_RESTRICT s)[decode_block_keys]) {
  constexpr int cw = 2 * width;
  constexpr bool split = GT < 4;
  const int nfull = d / cw, rem = d - nfull * cw;
  vf part[GT][decode_block_keys];  // per head and key: the lanes still to be summed
  // One key of the next block per key computed, the second of a pair half-way through its
  // chunks (see prefetch_row; next_k[i] is null past the next block's end).
  int j = 0;
  for (; j + 2 <= nb; j += 2) {
    if (next_k) prefetch_row(next_k[j], d);
    if (next_k && nfull == 0) prefetch_row(next_k[j + 1], d);
    const T* k0 = kp[j];
    const T* k1 = kp[j + 1];
    vf a0[GT], a1[GT], b0[GT], b1[GT];  // (key 0, key 1) x (first, second half of a chunk)
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) a0[g] = a1[g] = b0[g] = b1[g] = zero();
    const auto chunk = [&](const vf(&k)[4], const float* qc) {
      DMS_CPU_UNROLL
      for (int g = 0; g < GT; ++g) {
        const vf qa = load(qc + std::size_t(g) * dpad);
        const vf qb = load(qc + std::size_t(g) * dpad + width);
        a0[g] = madd(qa, k[0], a0[g]);
        a1[g] = madd(qa, k[2], a1[g]);
        if constexpr (split) {
          b0[g] = madd(qb, k[1], b0[g]);
          b1[g] = madd(qb, k[3], b1[g]);
        } else {
          a0[g] = madd(qb, k[1], a0[g]);
          a1[g] = madd(qb, k[3], a1[g]);
        }
      }
    };
    DMS_CPU_UNROLL
    for (int c = 0; c < nfull; ++c) {
      if (next_k && c == nfull / 2) prefetch_row(next_k[j + 1], d);
      vf k[4];
      load_pair(k0 + c * cw, k[0], k[1]);
      load_pair(k1 + c * cw, k[2], k[3]);
      chunk(k, q + c * cw);
    }
    if (rem) {
      vf k[4];
      load_pair_partial(k0 + nfull * cw, rem, k[0], k[1]);
      load_pair_partial(k1 + nfull * cw, rem, k[2], k[3]);
      chunk(k, q + nfull * cw);
    }
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) {
      part[g][j] = split ? a0[g] + b0[g] : a0[g];
      part[g][j + 1] = split ? a1[g] + b1[g] : a1[g];
    }
  }
  if (j < nb) {  // an odd last key, on its own
    if (next_k) prefetch_row(next_k[j], d);
    const T* k = kp[j];
    vf acc[GT], acc2[GT];
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) acc[g] = acc2[g] = zero();
    for (int c = 0; c < nfull + (rem ? 1 : 0); ++c) {
      vf ka, kb;
      if (c < nfull)
        load_pair(k + c * cw, ka, kb);
      else
        load_pair_partial(k + nfull * cw, rem, ka, kb);
      DMS_CPU_UNROLL
      for (int g = 0; g < GT; ++g) {
        const float* qg = q + std::size_t(g) * dpad + c * cw;
        acc[g] = madd(load(qg), ka, acc[g]);
        acc2[g] = madd(load(qg + width), kb, acc2[g]);
      }
    }
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) part[g][j] = acc[g] + acc2[g];
  }
  const int rounded = (nb + width - 1) / width * width;
  DMS_CPU_UNROLL
  for (int g = 0; g < GT; ++g) {
    for (int i = nb; i < rounded; ++i) part[g][i] = zero();
    for (int i = 0; i < rounded; i += width) transpose_sums(part[g] + i, s[g] + i);
  }
}

/// Online softmax over one block: updates the running max m and sum l of GT heads, writes
/// p = exp(s - m_new) (0 for the padding lanes j >= nb) and the factor corr = exp(m_old - m_new)
/// by which the accumulated output must shrink.
template <int GT>
DMS_CPU_INLINE void block_softmax(float (*DMS_CPU_RESTRICT s)[decode_block_keys], int nb,
                                  float* DMS_CPU_RESTRICT m, float* DMS_CPU_RESTRICT l,
                                  float* DMS_CPU_RESTRICT corr,
                                  float (*DMS_CPU_RESTRICT p)[decode_block_keys]) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  DMS_CPU_UNROLL
  for (int g = 0; g < GT; ++g) {
    for (int j = nb; j < decode_block_keys; ++j) s[g][j] = neg_inf;
    vf mx = load(s[g]);
    DMS_CPU_UNROLL
    for (int j = width; j < decode_block_keys; j += width) mx = vmax(mx, load(s[g] + j));
    const float block_max = reduce_max(mx);
    const float m_old = m[g];
    const float m_new = block_max > m_old ? block_max : m_old;
    // Most blocks leave the max where it was: no exp, and a factor of exactly 1.
    corr[g] = m_new > m_old ? std::exp(m_old - m_new) : 1.0f;
    const vf shift = set1(m_new);
    vf sum = zero();
    DMS_CPU_UNROLL
    for (int j = 0; j < decode_block_keys; j += width) {
      const vf e = exp(load(s[g] + j) - shift);
      store(p[g] + j, e);
      sum += e;
    }
    l[g] = l[g] * corr[g] + reduce_add(sum);
    m[g] = m_new;
  }
}

/// One pass of block_values: the NC chunks from chunk c0 (a chunk past nfull is the partial one).
template <class T, int GT, int NC>
DMS_CPU_INLINE void values_pass(const T* const* vp, int nb, int dpad, int c0, int nfull, int rem,
                                const float (*DMS_CPU_RESTRICT p)[decode_block_keys],
                                const float* DMS_CPU_RESTRICT corr, float* DMS_CPU_RESTRICT acc) {
  constexpr int cw = 2 * width;
  vf o[NC][GT][2];
  DMS_CPU_UNROLL
  for (int u = 0; u < NC; ++u) {
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) {
      const float* src = acc + std::size_t(g) * dpad + (c0 + u) * cw;
      o[u][g][0] = load(src);
      o[u][g][1] = load(src + width);
      if (corr[g] != 1.0f) {
        const vf cg = set1(corr[g]);
        o[u][g][0] = o[u][g][0] * cg;
        o[u][g][1] = o[u][g][1] * cg;
      }
    }
  }
  for (int j = 0; j < nb; ++j) {
    vf v[NC][2];
    DMS_CPU_UNROLL
    for (int u = 0; u < NC; ++u) {
      const int c = c0 + u;
      if (c < nfull)
        load_pair(vp[j] + c * cw, v[u][0], v[u][1]);
      else
        load_pair_partial(vp[j] + nfull * cw, rem, v[u][0], v[u][1]);
    }
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) {
      const vf pj = set1(p[g][j]);
      DMS_CPU_UNROLL
      for (int u = 0; u < NC; ++u) {
        o[u][g][0] = madd(pj, v[u][0], o[u][g][0]);
        o[u][g][1] = madd(pj, v[u][1], o[u][g][1]);
      }
    }
  }
  DMS_CPU_UNROLL
  for (int u = 0; u < NC; ++u) {
    DMS_CPU_UNROLL
    for (int g = 0; g < GT; ++g) {
      float* dst = acc + std::size_t(g) * dpad + (c0 + u) * cw;
      store(dst, o[u][g][0]);
      store(dst + width, o[u][g][1]);
    }
  }
}

/// acc_g = acc_g * corr_g + sum_j p[g][j] v_j for GT heads, in passes over NC chunks of 2 * width
/// channels: a pass's 2 * NC * GT accumulators stay in registers while the block's keys add to
/// them one by one, so the accumulators are loaded and stored once per block (a pass per group
/// of keys reloads them every group). Each channel sums its terms in key order. The next
/// block's value rows (next_v, or null) are prefetched spread evenly over the passes.
template <class T, int GT>
DMS_CPU_INLINE void block_values(const T* const* vp, const T* const* next_v, int nb, int dpad,
                                 int d, const float (*DMS_CPU_RESTRICT p)[decode_block_keys],
                                 const float* DMS_CPU_RESTRICT corr, float* DMS_CPU_RESTRICT acc) {
  constexpr int cw = 2 * width;
  // Two chunks per pass where 32 registers hold their 4 * GT accumulators (AVX-512): each
  // broadcast of p and each pass over the keys then feeds twice the FMAs (about 5% less time
  // per key with K/V in L2 on a Xeon; the sums are the same bit for bit).
  constexpr int NC = (width == 16 && GT <= 4) ? 2 : 1;
  const int nfull = d / cw, rem = d - nfull * cw;
  const int nchunks = nfull + (rem ? 1 : 0);
  int fetched = 0;  // next_v rows prefetched so far
  int c = 0;
  for (; c + NC <= nchunks; c += NC) {
    if (next_v)
      for (const int until = (c + NC) * decode_block_keys / nchunks; fetched < until; ++fetched)
        prefetch_row(next_v[fetched], d);
    values_pass<T, GT, NC>(vp, nb, dpad, c, nfull, rem, p, corr, acc);
  }
  for (; c < nchunks; ++c) {
    if (next_v)
      for (const int until = (c + 1) * decode_block_keys / nchunks; fetched < until; ++fetched)
        prefetch_row(next_v[fetched], d);
    values_pass<T, GT, 1>(vp, nb, dpad, c, nfull, rem, p, corr, acc);
  }
  for (; next_v && fetched < decode_block_keys; ++fetched) prefetch_row(next_v[fetched], d);
}

/// The live slots of one block of the walk: their K and V rows and their slots. Past `count`
/// the row pointers are null (nothing to prefetch).
template <class T>
struct decode_block_slots {
  const T* k[decode_block_keys];
  const T* v[decode_block_keys];
  std::int32_t slot[decode_block_keys];
  int count;
};

/// One block for heads [h0, h0 + GT) of the group; `next` (or null) is prefetched meanwhile.
/// D is the head_dim when the walk was compiled for one (0: read it from the view).
template <class T, int GT, int D>
DMS_CPU_INLINE void decode_block_tile(const ::dms::cpu::detail::decode_chunk_args<T>& a, int h0,
                                      const decode_block_slots<T>& b,
                                      const decode_block_slots<T>* next, int done) {
  alignas(64) float s[GT][decode_block_keys];
  alignas(64) float p[GT][decode_block_keys];
  float corr[GT];
  constexpr int cw = 2 * width;
  const int d = D > 0 ? D : a.view.head_dim;
  const int dpad = D > 0 ? (D + cw - 1) / cw * cw : a.dpad;
  const int nb = b.count;
  block_logits<T, GT>(a.q + std::size_t(h0) * dpad, dpad, d, b.k, next ? next->k : nullptr, nb, s);
  if (a.logits) DMS_CPU_UNROLL
  for (int g = 0; g < GT; ++g)
    std::memcpy(a.logits + std::size_t(h0 + g) * a.cap + done, s[g], sizeof(float) * nb);
  block_softmax<GT>(s, nb, a.m + h0, a.l + h0, corr, p);
  block_values<T, GT>(b.v, next ? next->v : nullptr, nb, dpad, d, p, corr,
                      a.acc + std::size_t(h0) * dpad);
}

template <class T, int D>
DMS_CPU_INLINE void decode_block(const ::dms::cpu::detail::decode_chunk_args<T>& a,
                                 const decode_block_slots<T>& b, const decode_block_slots<T>* next,
                                 int done) {
  // Heads in tiles of 4, 2, 1: a tile's accumulators fit the 16 registers of AVX2; a group of
  // more than 4 heads reads the block's K/V again from L1 for each further tile.
  for (int h0 = 0; h0 < a.group;) {
    const int left = a.group - h0;
    if (left >= 4) {
      decode_block_tile<T, 4, D>(a, h0, b, h0 == 0 ? next : nullptr, done);
      h0 += 4;
    } else if (left >= 2) {
      decode_block_tile<T, 2, D>(a, h0, b, h0 == 0 ? next : nullptr, done);
      h0 += 2;
    } else {
      decode_block_tile<T, 1, D>(a, h0, b, h0 == 0 ? next : nullptr, done);
      h0 += 1;
    }
  }
}

/// The walk of one work item: the pages [first, first + num_pages) of a row's read list, block
/// by block. It gathers each block's live slots one block ahead of the arithmetic, so that the
/// block being computed prefetches the next one. D: as in decode_block_tile.
template <class T, int D>
struct decode_walker {
  const ::dms::cpu::detail::decode_chunk_args<T>* a = nullptr;
  int wi = 0, ws = 0;  // the position: wi indexes the item's pages, ws is the slot in that page
  int cur = 0, done = 0;
  decode_block_slots<T> blocks[2];

  void start(const ::dms::cpu::detail::decode_chunk_args<T>& item) {
    a = &item;
    for (int g = 0; g < item.group; ++g) {
      item.m[g] = -std::numeric_limits<float>::infinity();
      item.l[g] = 0.0f;
    }
    std::fill(item.acc, item.acc + std::size_t(item.group) * item.dpad, 0.0f);
    gather(blocks[cur]);
  }
  [[nodiscard]] bool active() const { return blocks[cur].count > 0; }

  void gather(decode_block_slots<T>& b) {
    constexpr int nblk = decode_block_keys;
    const auto& vw = a->view;
    const int ps = vw.page_size, d = D > 0 ? D : vw.head_dim;
    b.count = 0;
    for (; wi < a->num_pages; ++wi, ws = 0) {
      const int lp = a->pages ? a->pages[wi] : a->first_page + wi;
      const std::int64_t base = std::int64_t(vw.page(a->row, lp)) * ps;
      const int count = std::min(ps, a->length - lp * ps);
      const std::int32_t* pos = vw.position + base;
      for (; ws < count; ++ws) {
        if (pos[ws] < 0) continue;  // a hole
        if (b.count == nblk) return;
        b.k[b.count] = vw.k + (base + ws) * d;
        b.v[b.count] = vw.v + (base + ws) * d;
        b.slot[b.count] = lp * ps + ws;
        ++b.count;
      }
    }
    std::fill(b.k + b.count, b.k + nblk, nullptr);
    std::fill(b.v + b.count, b.v + nblk, nullptr);
  }

  /// Computes the current block (an active walker's) and gathers the one after the next.
  void step() {
    const decode_block_slots<T>& b = blocks[cur];
    decode_block_slots<T>& next = blocks[cur ^ 1];
    gather(next);
    if (a->slots) std::copy(b.slot, b.slot + b.count, a->slots + done);
    decode_block<T, D>(*a, b, next.count > 0 ? &next : nullptr, done);
    done += b.count;
    cur ^= 1;
  }
  void finish() const { *a->count = done; }
};

/// n (<= decode_max_lockstep) work items, block by block in turn: a block of the first, one of
/// the second, ..., then the first's next block. Items of rows whose pages lie next to each
/// other in the pool (rows that grew in the same steps under page_placement::stack) then read
/// it in one run instead of a stream per row that restarts every page. Each item's blocks are
/// computed exactly as when it runs alone, in the same order, so its result is bit for bit the
/// same; only the order in which memory is read changes.
template <class T, int D>
void decode_walk(const ::dms::cpu::detail::decode_chunk_args<T>* items, int n) noexcept {
  decode_walker<T, D> w[::dms::cpu::detail::decode_max_lockstep];
  for (int i = 0; i < n; ++i) w[i].start(items[i]);
  for (bool any = true; any;) {
    any = false;
    for (int i = 0; i < n; ++i)
      if (w[i].active()) {
        w[i].step();
        any = true;
      }
  }
  for (int i = 0; i < n; ++i) w[i].finish();
}

/// n (in [1, decode_max_lockstep]) work items, in turn (decode_walk). The common head dims get a
/// walk compiled for them: with the chunk loops' trip counts known, the compiler unrolls them
/// and keeps the accumulators in registers: on Zen 5 with K/V in L3, 30% less time per key than
/// the walk for any head_dim with AVX-512, 0-10% with AVX2 (docs/performance/cpu_fast_path.md).
template <class T>
void decode_chunks(const ::dms::cpu::detail::decode_chunk_args<T>* items, int n) noexcept {
  switch (items[0].view.head_dim) {
    case 64:
      decode_walk<T, 64>(items, n);
      break;
    case 128:
      decode_walk<T, 128>(items, n);
      break;
    default:
      decode_walk<T, 0>(items, n);
      break;
  }
}

/// One work item.
template <class T>
void decode_chunk(const ::dms::cpu::detail::decode_chunk_args<T>& a) noexcept {
  decode_chunks<T>(&a, 1);
}

/// out[j] = sum_g exp(logits[g][j] - lse[g]) for j < n: a key's probability summed over the
/// group, which is what TOVA and H2O fold into its score.
inline void group_probability(const float* DMS_CPU_RESTRICT logits, int cap, int n, int group,
                              const float* DMS_CPU_RESTRICT lse,
                              float* DMS_CPU_RESTRICT out) noexcept {
  int j = 0;
  for (; j + width <= n; j += width) {
    vf sum = zero();
    for (int g = 0; g < group; ++g)
      sum += exp(load(logits + std::size_t(g) * cap + j) - set1(lse[g]));
    store(out + j, sum);
  }
  if (j < n) {  // the tail, one padded vector per head
    alignas(64) float x[width], y[width];
    vf sum = zero();
    for (int g = 0; g < group; ++g) {
      for (int t = 0; t < width; ++t)
        x[t] = j + t < n ? logits[std::size_t(g) * cap + j + t] - lse[g] : 0.0f;
      sum += exp(load(x));
    }
    store(y, sum);
    std::memcpy(out + j, y, sizeof(float) * std::size_t(n - j));
  }
}

/// out[j] = exp(logits[j] - lse) for j < n: one head's probabilities.
inline void head_probability(const float* DMS_CPU_RESTRICT logits, int n, float lse,
                             float* DMS_CPU_RESTRICT out) noexcept {
  int j = 0;
  for (; j + width <= n; j += width) store(out + j, exp(load(logits + j) - set1(lse)));
  if (j < n) {
    alignas(64) float x[width], y[width];
    for (int t = 0; t < width; ++t) x[t] = j + t < n ? logits[j + t] - lse : 0.0f;
    store(y, exp(load(x)));
    std::memcpy(out + j, y, sizeof(float) * std::size_t(n - j));
  }
}
