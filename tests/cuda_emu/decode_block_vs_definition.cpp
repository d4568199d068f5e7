// Decoder blocks of a single-sequence decode step on the CPU emulation
// (prelude.h): the five kernels per block (RMS norm + Q/K/V, RoPE + KV
// append + split-K attention, o_proj into the residual, RMS norm + gate/up +
// SiLU, down_proj into the residual), launched as the Rust host launches
// them, on random 4-bit weights, activations and KV caches, against the
// block computed in double precision from its definition. Cases cover both
// weight formats, double quantization, compute-dtype rounding, split rows
// (ksplit > 1) on Llama-3.2-1B shapes, the half-precision single-row
// NF4/FP4 kernels, grids capped below each launch's logical blocks (blocks
// looping over several), and caches long enough for multi-tile key ranges;
// the batch GEMV instances (2 to 8 rows) of an MLP have cases of their own.
// Prints one line per case and exits non-zero when a case is outside its
// bound.
#include "kernels.cpp"

#include <algorithm>
#include <functional>
#include <memory>
#include <random>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static char* arena;
static size_t arena_used, arena_cap = size_t(1) << 30;
template <class T>
T* dalloc(size_t n) {
    size_t bytes = (n * sizeof(T) + 255) & ~size_t(255);
    if (arena_used + bytes > arena_cap) abort();
    T* p = (T*)(arena + arena_used);
    arena_used += bytes;
    memset(p, 0, bytes);
    return p;
}

// Forks one process per block; each runs `threads` threads of `fn`.
static void launch(dim3 grid, unsigned threads, size_t smem, const std::function<void()>& fn) {
    std::vector<pid_t> kids;
    const unsigned nb = grid.x * grid.y * grid.z;
    for (unsigned b = 0; b < nb; b++) {
        pid_t pid = fork();
        if (pid == 0) {
            blockIdx = dim3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
            gridDim = grid;
            blockDim = dim3{threads, 1, 1};
            std::vector<float> dyn(smem / 4 + 16, NAN);
            emu_dyn_smem = dyn.data();
            std::barrier<> bar(threads);
            emu_block_bar = &bar;
            std::vector<EmuWarp> warps(threads / 32);
            std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
            for (auto& w : warps) {
                warp_bars.push_back(std::make_unique<std::barrier<>>(32));
                w.bar = warp_bars.back().get();
            }
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < threads; t++)
                ts.emplace_back([&, t] {
                    threadIdx = dim3{t, 0, 0};
                    emu_warp = &warps[t / 32];
                    fn();
                });
            for (auto& t : ts) t.join();
            _exit(0);
        }
        kids.push_back(pid);
    }
    for (pid_t k : kids) {
        int st;
        waitpid(k, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "block process failed (status %d)\n", st);
            exit(1);
        }
    }
}

static std::mt19937_64 rng(7);
static float urand(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
static float* rand_f(size_t n, float lo, float hi) {
    float* p = dalloc<float>(n);
    for (size_t i = 0; i < n; i++) p[i] = urand(lo, hi);
    return p;
}
static u32* rand_words(size_t n) {
    u32* p = dalloc<u32>(n);
    for (size_t i = 0; i < n; i++) p[i] = (u32)rng();
    return p;
}

struct Shape {
    int hidden, inter, q_heads, kv_heads, D, max_len, pos;
};

static int gemv_ksplit(int sm, int out, int in_chunks, int rpw) {
    int groups = (out + rpw - 1) / rpw, want = sm * 32, k = 1;
    while (k < 8 && groups * k < want && in_chunks >= 32 * 2 * k) k *= 2;
    return k;
}
// Words of the split B fragments a split-input tensor-core launch stages
// for `n` rows of `in` inputs (split_mma_smem_floats in matmul.rs, less
// the tables): 16 per row, step and 128-input round.
static size_t split_words(int n, int in) { return (size_t)(in + 127) / 128 * 8 * n * 16; }

static int q4_blocks_h(int out, int rpw, int ks) {
    int per = rpw * (8 / ks);
    return (out + per - 1) / per;
}

static Q4BnbArgs make_bnb(int rows, int in, bool dq, float* code16) {
    Q4BnbArgs a{};
    const int bs_log2 = 6, nbs_log2 = 8;
    size_t nblk = ((size_t)rows * in) >> bs_log2;
    a.w = rand_words((size_t)rows * in / 8);
    for (int k = 0; k < 16; k++) a.code16[k] = code16[k];
    a.bs_log2 = bs_log2;
    a.nbs_log2 = nbs_log2;
    if (dq) {
        u8* codes = dalloc<u8>(nblk);
        for (size_t i = 0; i < nblk; i++) codes[i] = (u8)rng();
        a.codes = codes;
        a.code2 = rand_f(256, -1.f, 1.f);
        a.absmax = rand_f((nblk >> nbs_log2) + 1, 0.01f, 0.05f);
        a.offset = 0.03f;
    } else {
        a.absmax = rand_f(nblk, 0.01f, 0.08f);
    }
    return a;
}

static Q4PackedArgs make_packed(int rows, int in, int gsize) {
    Q4PackedArgs a{};
    int groups = (in + gsize - 1) / gsize;
    a.w = rand_words((size_t)rows * in / 8);
    u16* sc = dalloc<u16>((size_t)groups * rows);
    u16* z = dalloc<u16>((size_t)groups * rows);
    for (size_t i = 0; i < (size_t)groups * rows; i++) {
        sc[i] = f2h(urand(0.002f, 0.02f));
        z[i] = (u16)(rng() % 16);
    }
    a.scales = sc;
    a.zeros = z;
    a.wpr = in / 8;
    a.gsize = gsize;
    return a;
}

// One decoder block's seven matrices in the order q, k, v, o, gate, up,
// down, and its two norms.
template <class A>
struct Layer {
    A m[7];
    const float* ln1;
    const float* ln2;
};

// The device state of a step: the residual row, each layer's KV cache, and
// the buffers the blocks share.
struct State {
    float *x, *q, *k, *v, *att, *act, *part;
    std::vector<float*> kc, vc;
    u32* count;
};

static State fresh_state(const Shape& s, int layers, const float* x0,
                         const std::vector<float*>& kc0, const std::vector<float*>& vc0,
                         int splits) {
    State st;
    const size_t cache = (size_t)s.max_len * s.kv_heads * s.D;
    st.x = dalloc<float>(s.hidden);
    memcpy(st.x, x0, s.hidden * 4);
    for (int l = 0; l < layers; l++) {
        st.kc.push_back(dalloc<float>(cache));
        st.vc.push_back(dalloc<float>(cache));
        memcpy(st.kc[l], kc0[l], cache * 4);
        memcpy(st.vc[l], vc0[l], cache * 4);
    }
    st.q = dalloc<float>(s.q_heads * s.D);
    st.k = dalloc<float>(s.kv_heads * s.D);
    st.v = dalloc<float>(s.kv_heads * s.D);
    st.att = dalloc<float>(s.q_heads * s.D);
    st.act = dalloc<float>(s.inter);
    st.part = dalloc<float>((size_t)s.q_heads * splits * (s.D + 4));
    st.count = dalloc<u32>(s.kv_heads);
    return st;
}

// Weight (row, col) of matrix `b` or `k` (`out` x `in`) in the case's
// format, dequantized in double precision.
static double weight(int fmt, const Q4BnbArgs& b, const Q4PackedArgs& k, int out, int in, int row,
                     int col) {
    if (fmt == 2) {
        const u32 word = k.w[(size_t)row * k.wpr + col / 8];
        const int q = (word >> (4 * (col % 8))) & 15;
        const size_t g = (size_t)(col / k.gsize) * out + row;
        return (double)h2f(k.scales[g]) * (q - (int)k.zeros[g]);
    }
    const size_t idx = (size_t)row * in + col;
    const u8 byte = ((const u8*)b.w)[idx / 2];
    const int q = idx % 2 == 0 ? byte >> 4 : byte & 15;
    const size_t blk = idx >> b.bs_log2;
    const double scale = b.codes ? (double)b.code2[b.codes[blk]] * b.absmax[blk >> b.nbs_log2] + b.offset
                                 : (double)b.absmax[blk];
    return (double)b.code16[q] * scale;
}

// W x for matrix `i` (q, k, v, o, gate, up, down) of a block.
static std::vector<double> matvec(int fmt, const Layer<Q4BnbArgs>& wb,
                                  const Layer<Q4PackedArgs>& wp, int i, int out, int in,
                                  const std::vector<double>& x) {
    std::vector<double> y(out, 0.0);
    for (int r = 0; r < out; r++)
        for (int c = 0; c < in; c++) y[r] += weight(fmt, wb.m[i], wp.m[i], out, in, r, c) * x[c];
    return y;
}

static std::vector<double> rms_norm(const std::vector<double>& x, const float* w, double eps) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / sqrt(ss / x.size() + eps);
    std::vector<double> h(x.size());
    for (size_t i = 0; i < x.size(); i++) h[i] = x[i] * inv * w[i];
    return h;
}

// HF "rotate half" RoPE of one head at position p.
static void rope(double* h, int D, const float* inv, int p) {
    for (int i = 0; i < D / 2; i++) {
        const double a = h[i], b = h[i + D / 2], th = (double)p * inv[i];
        h[i] = a * cos(th) - b * sin(th);
        h[i + D / 2] = b * cos(th) + a * sin(th);
    }
}

// ||got - want|| / ||want||.
static double rel_err(const float* got, const std::vector<double>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); i++) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

// A block's MLP in double precision: silu(G h) * (U h) (matrices 4 and 5,
// `inter` x `hidden`) and the down product of that (matrix 6).
struct Mlp {
    std::vector<double> act, down;
};
static Mlp reference_mlp(int fmt, const Layer<Q4BnbArgs>& wb, const Layer<Q4PackedArgs>& wp,
                         const std::vector<double>& h, int hidden, int inter) {
    const auto g = matvec(fmt, wb, wp, 4, inter, hidden, h);
    const auto u = matvec(fmt, wb, wp, 5, inter, hidden, h);
    std::vector<double> act(inter);
    for (int i = 0; i < inter; i++) act[i] = g[i] / (1 + exp(-g[i])) * u[i];
    std::vector<double> down = matvec(fmt, wb, wp, 6, hidden, inter, act);
    return Mlp{act, down};
}

// The bound on a product's relative error in format `fmt` with compute
// dtype `cd` (none, f16, bf16), f32 products (not the half-precision
// single-row kernels).
static double product_tol(int fmt, int cd) {
    return fmt == 2 || cd == 0 ? 1e-5 : (cd == 1 ? 2e-3 : 1e-2);
}

// One block in double precision from its definition (no kernel code):
// updates the residual row `x` and returns the key and value appended at
// position `pos`.
struct Appended {
    std::vector<double> k, v;
};
static Appended reference_block(const Shape& s, int fmt, const Layer<Q4BnbArgs>& wb,
                                const Layer<Q4PackedArgs>& wp, std::vector<double>& x,
                                const float* ln1, const float* ln2, const float* inv,
                                const float* kc0, const float* vc0, double eps) {
    const int qo = s.q_heads * s.D, kvo = s.kv_heads * s.D, G = s.q_heads / s.kv_heads;
    const auto h = rms_norm(x, ln1, eps);
    auto q = matvec(fmt, wb, wp, 0, qo, s.hidden, h);
    auto k = matvec(fmt, wb, wp, 1, kvo, s.hidden, h);
    const auto v = matvec(fmt, wb, wp, 2, kvo, s.hidden, h);
    for (int hd = 0; hd < s.q_heads; hd++) rope(&q[hd * s.D], s.D, inv, s.pos);
    for (int hd = 0; hd < s.kv_heads; hd++) rope(&k[hd * s.D], s.D, inv, s.pos);
    std::vector<double> att(qo, 0.0);
    for (int hd = 0; hd < s.q_heads; hd++) {
        const int g = hd / G;
        const auto key = [&](int j, int c) {
            return j == s.pos ? k[g * s.D + c] : (double)kc0[(size_t)j * kvo + g * s.D + c];
        };
        const auto val = [&](int j, int c) {
            return j == s.pos ? v[g * s.D + c] : (double)vc0[(size_t)j * kvo + g * s.D + c];
        };
        std::vector<double> sc(s.pos + 1);
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j <= s.pos; j++) {
            double d = 0;
            for (int c = 0; c < s.D; c++) d += q[hd * s.D + c] * key(j, c);
            sc[j] = d / sqrt((double)s.D);
            mx = std::max(mx, sc[j]);
        }
        for (int j = 0; j <= s.pos; j++) sum += (sc[j] = exp(sc[j] - mx));
        for (int j = 0; j <= s.pos; j++)
            for (int c = 0; c < s.D; c++) att[hd * s.D + c] += sc[j] / sum * val(j, c);
    }
    const auto o = matvec(fmt, wb, wp, 3, s.hidden, qo, att);
    for (int i = 0; i < s.hidden; i++) x[i] += o[i];
    const Mlp m = reference_mlp(fmt, wb, wp, rms_norm(x, ln2, eps), s.hidden, s.inter);
    for (int i = 0; i < s.hidden; i++) x[i] += m.down[i];
    return Appended{k, v};
}

// One case: `layers` decoder blocks in format `fmt` (0 bnb no DQ, 1 bnb DQ,
// 2 packed), compute dtype `cd`, `sm` SMs (for the host's ksplit rule),
// `cap` blocks per GEMV launch (a one-wave cap); with `mixed` every bnb
// matrix has a code table of its own (as NF4 and FP4 matrices mixed in one
// launch would); with `half` the bnb GEMVs take the half-precision kernels
// (`_h1`, `norm3_h`), as the host launches them for an f16 or bf16 compute
// dtype.
static bool run_case(const Shape& s, int layers, int fmt, int cd, int sm, int cap,
                     bool mixed = false, bool half = false) {
    arena_used = 0;
    const int qo = s.q_heads * s.D, kvo = s.kv_heads * s.D, G = s.q_heads / s.kv_heads;
    const int rows[7] = {qo, kvo, kvo, s.hidden, s.inter, s.inter, s.hidden};
    const int ins[7] = {s.hidden, s.hidden, s.hidden, qo, s.hidden, s.hidden, s.inter};
    const size_t cache = (size_t)s.max_len * kvo;
    // Per layer: weights (with norms), and the initial caches.
    std::vector<Layer<Q4BnbArgs>> lb(layers);
    std::vector<Layer<Q4PackedArgs>> lp(layers);
    std::vector<float*> kc0, vc0;
    for (int l = 0; l < layers; l++) {
        float* code16 = rand_f(16, -1.f, 1.f);
        for (int i = 0; i < 7; i++) {
            if (mixed && i > 0) code16 = rand_f(16, -1.f, 1.f);
            if (fmt == 2) lp[l].m[i] = make_packed(rows[i], ins[i], 32);
            else lb[l].m[i] = make_bnb(rows[i], ins[i], fmt == 1, code16);
        }
        lb[l].ln1 = lp[l].ln1 = rand_f(s.hidden, 0.5f, 1.5f);
        lb[l].ln2 = lp[l].ln2 = rand_f(s.hidden, 0.5f, 1.5f);
        kc0.push_back(rand_f(cache, -1.f, 1.f));
        vc0.push_back(rand_f(cache, -1.f, 1.f));
    }
    float* x0 = rand_f(s.hidden, -1.f, 1.f);
    float* inv = dalloc<float>(s.D / 2);
    for (int i = 0; i < s.D / 2; i++) inv[i] = powf(10000.f, -2.f * i / s.D);
    u32* slot = dalloc<u32>(1);
    u32* pos = dalloc<u32>(1);
    pos[0] = s.pos;
    int splits = (s.max_len + 31) / 32;
    splits = splits < 1 ? 1 : (splits > 32 ? 32 : splits);
    const int buffers = (s.max_len + splits - 1) / splits > 32 ? 2 : 1;
    const int KS = ((s.D / 4) | 1) * 4;
    const size_t att_smem = 4 * (G * s.D + 2 * s.D + buffers * 32 * (KS + s.D));
    const float eps = 1e-5f, scale = 1.f / sqrtf((float)s.D);
    const int ks_qkv = gemv_ksplit(sm, qo + 2 * kvo, s.hidden / 32, 4);
    const int ks_o = std::min(gemv_ksplit(sm, s.hidden, qo / 32, 4), 4);  // WIDE_SINGLE
    const int ks_gu = 1;  // WIDE_PAIR_SINGLE in matmul.rs
    const int ks_down = std::min(gemv_ksplit(sm, s.hidden, s.inter / 32, 4), 4);
    auto staged = [&](int in) {
        return (size_t)(half ? q4_pairs_at<true>(in) + Q4_PAIR_FLOATS_H
                             : q4_pairs_at<false>(in) + Q4_PAIR_FLOATS) * 4;
    };

    // The kernels, block after block.
    State a = fresh_state(s, layers, x0, kc0, vc0, splits);
    for (int l = 0; l < layers; l++) {
        const Layer<Q4BnbArgs>& wb = lb[l];
        const Layer<Q4PackedArgs>& wp = lp[l];
        GemvMulti m{};
        m.y[0] = a.q; m.y[1] = a.k; m.y[2] = a.v;
        m.out[0] = qo; m.out[1] = kvo; m.out[2] = kvo;
        int tot = 0;
        for (int i = 0; i < 3; i++) tot += (m.blocks[i] = q4_blocks_h(m.out[i], 4, ks_qkv));
        launch({(unsigned)std::min(tot, cap)}, 256, staged(s.hidden), [&] {
            if (fmt == 2) gemv_q4packed_norm3(wp.m[0], wp.m[1], wp.m[2], m, a.x, wp.ln1, eps, s.hidden, ks_qkv);
            else if (half) gemv_q4bnb_norm3_h(wb.m[0], wb.m[1], wb.m[2], m, a.x, wb.ln1, eps, s.hidden, ks_qkv, cd);
            else gemv_q4bnb_norm3(wb.m[0], wb.m[1], wb.m[2], m, a.x, wb.ln1, eps, s.hidden, ks_qkv, cd);
        });
        const unsigned threads = 32 * std::min(std::max(G, 4), 8);
        launch({(unsigned)splits, (unsigned)s.kv_heads, 1}, threads, att_smem, [&] {
            attn_decode(a.q, a.k, a.v, a.kc[l], a.vc[l], slot, pos, inv, a.part, a.count, a.att,
                        s.q_heads, s.kv_heads, s.D, s.max_len, splits, scale);
        });
        auto gemv = [&](int i, const float* x, float* y, int out, int in, int ks, int acc) {
            launch({(unsigned)std::min(q4_blocks_h(out, 4, ks), cap)}, 256, staged(in), [&] {
                if (fmt == 2) {
                    const Q4PackedArgs& w = wp.m[i];
                    gemv_q4packed_b1(w.w, w.scales, w.zeros, nullptr, w.wpr, w.gsize, x, y, 1, out, in, ks, acc);
                } else {
                    const Q4BnbArgs& w = wb.m[i];
                    (half ? gemv_q4bnb_h1 : gemv_q4bnb_b1)(w, x, y, 1, out, in, ks, acc, cd);
                }
            });
        };
        gemv(3, a.att, a.x, s.hidden, qo, ks_o, 1);
        launch({(unsigned)std::min(q4_blocks_h(s.inter, 2, ks_gu), cap)}, 256, staged(s.hidden), [&] {
            if (fmt == 2) {
                const Q4PackedArgs &g = wp.m[4], &u = wp.m[5];
                gemv_q4packed_b1_pair(g.w, g.scales, g.zeros, nullptr, g.wpr, g.gsize, u.w, u.scales,
                                      u.zeros, nullptr, u.wpr, u.gsize, a.x, a.act, 1, s.inter,
                                      s.hidden, ks_gu, 0, wp.ln2, eps);
            } else {
                const Q4BnbArgs &g = wb.m[4], &u = wb.m[5];
                (half ? gemv_q4bnb_h1_pair : gemv_q4bnb_b1_pair)(g, u, a.x, a.act, 1, s.inter, s.hidden,
                                                                 ks_gu, 0, cd, wb.ln2, eps);
            }
        });
        gemv(6, a.act, a.x, s.hidden, s.inter, ks_down, 1);
    }

    // The step changed the residual row and reset the attention counters.
    const bool ok = memcmp(a.x, x0, s.hidden * 4) != 0 && a.count[0] == 0;
    // The kernels against the definitions, within the rounding of the
    // compute dtype (none, f16, bf16).
    std::vector<double> x(x0, x0 + s.hidden);
    double ek = 0, ev = 0;
    for (int l = 0; l < layers; l++) {
        const Appended r = reference_block(s, fmt, lb[l], lp[l], x, lb[l].ln1, lb[l].ln2, inv,
                                           kc0[l], vc0[l], eps);
        ek = std::max(ek, rel_err(a.kc[l] + (size_t)s.pos * kvo, r.k));
        ev = std::max(ev, rel_err(a.vc[l] + (size_t)s.pos * kvo, r.v));
    }
    const double ex = rel_err(a.x, x);
    // Half-precision kernels: f16 products summed in f16 over 32 weights.
    const double tol = half ? (cd == 2 ? 1e-2 : 5e-3) : product_tol(fmt, cd);
    const bool ref_ok = ex < tol && ek < tol && ev < tol;
    printf("%d layers, fmt %d%s%s cd %d, h%d i%d q%d kv%d D%d len%d pos%d, ks %d/%d/%d/%d, cap %d: "
           "%s; reference x %.1e k %.1e v %.1e: %s\n",
           layers, fmt, mixed ? " mixed codes" : "", half ? " half" : "", cd, s.hidden, s.inter, s.q_heads, s.kv_heads,
           s.D, s.max_len, s.pos,
           ks_qkv, ks_o, ks_gu, ks_down, cap, ok ? "RAN" : "DID NOT RUN", ex, ek, ev,
           ref_ok ? "WITHIN" : "OUTSIDE");
    return ok && ref_ok;
}

// The batch kernels (2 to 8 rows: the `b4` and `b8` instances) of an MLP:
// gate/up + SiLU of `n` rows, RMS-normalized in the launch when `norm`,
// then down added to each row's residual, launched as matmul.rs launches
// them (grids capped at `cap` blocks, so that blocks loop), against the
// definition in double precision.
static bool run_batch_case(int fmt, int cd, int n, int hidden, int inter, bool norm, int sm,
                           int cap, bool mma = false) {
    arena_used = 0;
    const int nb = n <= 4 ? 4 : 8;
    const int rpw = nb == 4 ? 2 : 1;  // Q4_PAIR_ROWS, WIDE_PAIR_BATCH4 / WIDE_PAIR
    float* code16 = rand_f(16, -1.f, 1.f);
    Layer<Q4BnbArgs> wb{};
    Layer<Q4PackedArgs> wp{};
    const int rows[3] = {inter, inter, hidden}, ins[3] = {hidden, hidden, inter};
    for (int i = 0; i < 3; i++) {
        // The packed tensor-core kernels take groups of a multiple of 128.
        if (fmt == 2) wp.m[4 + i] = make_packed(rows[i], ins[i], mma ? 128 : 64);
        else wb.m[4 + i] = make_bnb(rows[i], ins[i], fmt == 1, code16);
    }
    const float* nw = norm ? rand_f(hidden, 0.5f, 1.5f) : nullptr;
    const float* x = rand_f((size_t)n * hidden, -1.f, 1.f);
    float* y = rand_f((size_t)n * hidden, -1.f, 1.f);
    const std::vector<float> y0(y, y + (size_t)n * hidden);
    float* act = dalloc<float>((size_t)n * inter);
    const float eps = 1e-5f;
    // The tensor-core kernels: 16-row tiles and 128-input rounds (MMA in
    // matmul.rs).
    const int ks_gu = mma ? gemv_ksplit(sm, inter, hidden / 4, 16) : gemv_ksplit(sm, inter, hidden / 32, rpw);
    const int ks_down = mma ? gemv_ksplit(sm, hidden, inter / 4, 16) : gemv_ksplit(sm, hidden, inter / 32, 4);
    const size_t tables = (size_t)Q4_PAIR_FLOATS * 4;
    const size_t gu_smem = tables + (norm ? (size_t)nb * q4_pairs_at<false>(hidden) * 4 : 0);
    // Packed and f32 compute: the tables, then the batch's split B
    // fragments.
    if (mma && fmt != 2 && cd == 0) {
        launch({(unsigned)std::min(q4_blocks_h(inter, 16, ks_gu), cap)}, 256, tables + split_words(n, hidden) * 4, [&] {
            gemv_q4bnb_mma_f32_pair(wb.m[4], wb.m[5], x, act, n, inter, hidden, ks_gu, 0, cd, nw, eps);
        });
        launch({(unsigned)std::min(q4_blocks_h(hidden, 16, ks_down), cap)}, 256, tables + split_words(n, inter) * 4,
               [&] { gemv_q4bnb_mma_f32(wb.m[6], act, y, n, hidden, inter, ks_down, 1, cd, nullptr, 0.f); });
    } else if (mma && fmt == 2) {
        const Q4PackedArgs &g = wp.m[4], &u = wp.m[5], &d = wp.m[6];
        launch({(unsigned)std::min(q4_blocks_h(inter, 16, ks_gu), cap)}, 256, tables + split_words(n, hidden) * 4,
               [&] { gemv_q4packed_mma_pair(g, u, x, act, n, inter, hidden, ks_gu, 0, nw, eps); });
        launch({(unsigned)std::min(q4_blocks_h(hidden, 16, ks_down), cap)}, 256, tables + split_words(n, inter) * 4,
               [&] { gemv_q4packed_mma(d, act, y, n, hidden, inter, ks_down, 1, nullptr, 0.f); });
    } else if (mma) {
        // Grids capped at `cap` blocks (blocks loop); shared memory: the
        // tables, then the staged B fragments.
        launch({(unsigned)std::min(q4_blocks_h(inter, 16, ks_gu), cap)}, 256, tables + mma_b_words(hidden) * 4, [&] {
            gemv_q4bnb_mma_pair(wb.m[4], wb.m[5], x, act, n, inter, hidden, ks_gu, 0, cd, nw, eps);
        });
        launch({(unsigned)std::min(q4_blocks_h(hidden, 16, ks_down), cap)}, 256, tables + mma_b_words(inter) * 4,
               [&] { gemv_q4bnb_mma(wb.m[6], act, y, n, hidden, inter, ks_down, 1, cd, nullptr, 0.f); });
    } else {
    launch({(unsigned)std::min(q4_blocks_h(inter, rpw, ks_gu), cap)}, 256, gu_smem, [&] {
        if (fmt == 2) {
            const Q4PackedArgs &g = wp.m[4], &u = wp.m[5];
            (nb == 4 ? gemv_q4packed_b4_pair : gemv_q4packed_b8_pair)(
                g.w, g.scales, g.zeros, nullptr, g.wpr, g.gsize, u.w, u.scales, u.zeros, nullptr,
                u.wpr, u.gsize, x, act, n, inter, hidden, ks_gu, 0, nw, eps);
        } else {
            (nb == 4 ? gemv_q4bnb_b4_pair : gemv_q4bnb_b8_pair)(wb.m[4], wb.m[5], x, act, n, inter,
                                                               hidden, ks_gu, 0, cd, nw, eps);
        }
    });
    launch({(unsigned)std::min(q4_blocks_h(hidden, 4, ks_down), cap)}, 256, tables, [&] {
        if (fmt == 2) {
            const Q4PackedArgs& d = wp.m[6];
            (nb == 4 ? gemv_q4packed_b4 : gemv_q4packed_b8)(d.w, d.scales, d.zeros, nullptr, d.wpr,
                                                             d.gsize, act, y, n, hidden, inter,
                                                             ks_down, 1);
        } else {
            (nb == 4 ? gemv_q4bnb_b4 : gemv_q4bnb_b8)(wb.m[6], act, y, n, hidden, inter, ks_down, 1,
                                                       cd);
        }
    });
    }
    double ea = 0, ey = 0;
    for (int b = 0; b < n; b++) {
        std::vector<double> h(x + (size_t)b * hidden, x + (size_t)(b + 1) * hidden);
        if (norm) h = rms_norm(h, nw, eps);
        Mlp m = reference_mlp(fmt, wb, wp, h, hidden, inter);
        std::vector<double>& want = m.down;
        for (int i = 0; i < hidden; i++) want[i] += y0[(size_t)b * hidden + i];
        ea = std::max(ea, rel_err(act + (size_t)b * inter, m.act));
        ey = std::max(ey, rel_err(y + (size_t)b * hidden, want));
    }
    const double tol = product_tol(fmt, cd);
    const bool within = ea < tol && ey < tol;
    printf("batch %d (%s)%s, fmt %d cd %d, h%d i%d, ks %d/%d, cap %d: RAN; reference act %.1e "
           "y %.1e: %s\n",
           n, mma ? "mma" : (nb == 4 ? "b4" : "b8"), norm ? " norm" : "", fmt, cd, hidden, inter, ks_gu, ks_down, cap, ea, ey,
           within ? "WITHIN" : "OUTSIDE");
    return within;
}

// The dense bf16 tensor-core kernel (gemv_bf16_mma): `n` rows added to
// a residual, a grid of `grid` blocks looping over the 16-row tiles (the
// last one partial), against the product in double precision.
static bool run_dense_mma_case(int n, int out, int in, int grid) {
    arena_used = 0;
    u16* w = dalloc<u16>((size_t)out * in);
    for (size_t i = 0; i < (size_t)out * in; i++) w[i] = f2bf(urand(-1.f, 1.f));
    const float* x = rand_f((size_t)n * in, -1.f, 1.f);
    float* y = rand_f((size_t)n * out, -1.f, 1.f);
    const std::vector<float> y0(y, y + (size_t)n * out);
    launch({(unsigned)grid}, 256, (size_t)mma_dense_b_words(in) * 4,
           [&] { gemv_bf16_mma(w, x, y, n, out, in, 1, 1); });
    double err = 0;
    for (int b = 0; b < n; b++) {
        std::vector<double> want(out);
        for (int r = 0; r < out; r++) {
            double s = y0[(size_t)b * out + r];
            for (int c = 0; c < in; c++)
                s += (double)__uint_as_float((u32)w[(size_t)r * in + c] << 16) * x[(size_t)b * in + c];
            want[r] = s;
        }
        err = std::max(err, rel_err(y + (size_t)b * out, want));
    }
    const bool within = err < 1e-5;
    printf("dense bf16 mma, batch %d, %dx%d, grid %d: RAN; reference y %.1e: %s\n", n, out, in,
           grid, err, within ? "WITHIN" : "OUTSIDE");
    return within;
}

// A single packed 4-bit matrix on the tensor cores (gemv_q4packed_mma):
// `n` rows of an `out` x `in` product in groups of `gsize`, `ks` warps per
// tile, a grid of `grid` blocks, against the product in double precision.
static bool run_packed_mma_case(int n, int out, int in, int gsize, int grid, int ks) {
    arena_used = 0;
    const Q4PackedArgs q = make_packed(out, in, gsize);
    const Q4BnbArgs none{};
    const float* x = rand_f((size_t)n * in, -1.f, 1.f);
    float* y = rand_f((size_t)n * out, -1.f, 1.f);
    launch({(unsigned)grid}, 256, (size_t)Q4_PAIR_FLOATS * 4 + split_words(n, in) * 4,
           [&] { gemv_q4packed_mma(q, x, y, n, out, in, ks, 0, nullptr, 0.f); });
    double err = 0;
    for (int b = 0; b < n; b++) {
        std::vector<double> want(out, 0.0);
        for (int r = 0; r < out; r++)
            for (int c = 0; c < in; c++)
                want[r] += weight(2, none, q, out, in, r, c) * x[(size_t)b * in + c];
        err = std::max(err, rel_err(y + (size_t)b * out, want));
    }
    const bool within = err < 1e-5;
    printf("packed mma, batch %d, %dx%d g%d, ks %d, grid %d: RAN; reference y %.1e: %s\n", n, out,
           in, gsize, ks, grid, err, within ? "WITHIN" : "OUTSIDE");
    return within;
}

int main() {
    arena = (char*)mmap(nullptr, arena_cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED) return 2;
    bool ok = true;
    const Shape small{128, 256, 4, 2, 32, 80, 45};
    ok &= run_case(small, 3, 1, 2, 2, 3);
    ok &= run_case(small, 2, 0, 0, 4, 5);
    ok &= run_case(small, 1, 0, 0, 2, 3, true);
    ok &= run_case(small, 3, 2, 0, 2, 4);
    const Shape group4{256, 512, 8, 2, 64, 100, 99};
    ok &= run_case(group4, 2, 1, 1, 3, 6);
    const Shape long_cache{128, 256, 4, 2, 32, 1100, 1050};
    ok &= run_case(long_cache, 2, 2, 0, 2, 4);
    const Shape llama1b{2048, 8192, 32, 8, 64, 640, 530};
    ok &= run_case(llama1b, 2, 1, 1, 132, 7);
    ok &= run_case(llama1b, 1, 2, 0, 132, 9);
    // SmolLM2-135M shapes: with in = 576 the single-row f32 kernels' pair
    // tables start 2376 bytes into dynamic shared memory (q4_pairs_at), 8-
    // but not 16-byte aligned, where a 16-byte store faults on a GPU.
    const Shape smollm2{576, 1536, 9, 3, 64, 48, 40};
    ok &= run_case(smollm2, 1, 0, 0, 30, 5);
    // Half-precision single-row kernels (NF4/FP4 with an f16 or bf16
    // compute dtype).
    ok &= run_case(small, 2, 1, 2, 2, 3, false, true);
    ok &= run_case(small, 1, 0, 1, 2, 3, true, true);
    ok &= run_case(llama1b, 1, 1, 2, 132, 7, false, true);
    // Batch instances: both formats, f32 and f16 compute, both instances,
    // with and without the norm, rows of 576 (SmolLM2), 256 and 2048.
    ok &= run_batch_case(1, 0, 3, 576, 384, true, 2, 3);
    ok &= run_batch_case(0, 1, 8, 256, 512, true, 2, 3);
    ok &= run_batch_case(2, 0, 2, 256, 512, false, 2, 3);
    ok &= run_batch_case(2, 0, 6, 576, 384, true, 2, 3);
    // Rows split over two warps (ksplit 2): gate/up, then down.
    ok &= run_batch_case(1, 0, 4, 2048, 256, true, 8, 5);
    ok &= run_batch_case(2, 0, 5, 256, 2048, false, 8, 5);
    // Tensor-core instances (NF4/FP4 with an f16 or bf16 compute dtype):
    // both dtypes, with and without double quantization and the norm, rows
    // of 576 (a last round of 64 inputs), warps sharing a tile (ksplit 8
    // for gate/up, then for down).
    ok &= run_batch_case(0, 1, 8, 256, 512, true, 2, 3, true);
    ok &= run_batch_case(1, 2, 3, 576, 384, true, 2, 3, true);
    ok &= run_batch_case(1, 1, 5, 2048, 256, false, 8, 5, true);
    ok &= run_batch_case(0, 2, 2, 256, 2048, true, 8, 5, true);
    // Packed integers on the tensor cores: a batch of 6 with ragged rows
    // (576 inputs: a half round), and 8 normalized rows at Llama widths.
    ok &= run_batch_case(2, 0, 6, 576, 384, false, 2, 3, true);
    ok &= run_batch_case(2, 0, 8, 2048, 256, true, 8, 5, true);
    // NF4/FP4 of an f32 compute dtype: split weights and inputs.
    ok &= run_batch_case(1, 0, 6, 576, 384, true, 2, 3, true);
    ok &= run_batch_case(0, 0, 8, 2048, 256, false, 8, 5, true);
    // One packed matrix: a partial last tile (72 rows), a half last round
    // (320 inputs) whose dead chunks belong to lanes holding batch rows 4
    // and 5, and two warps per tile.
    ok &= run_packed_mma_case(5, 72, 320, 128, 1, 2);
    ok &= run_dense_mma_case(5, 300, 256, 2);
    ok &= run_dense_mma_case(8, 64, 128, 1);
    printf(ok ? "ALL WITHIN\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
