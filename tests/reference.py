"""NumPy reference implementations of ALPT, written from DESIGN.md §1.

Kept independent of `alpt_keras` (no imports from it) so the tests compare
two implementations rather than one with itself.
"""

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def code_range(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _mix32(x):
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x2C1B3C6D)) & M32
    return x ^ (x >> np.uint64(16))


def hash_uniform(seed, salt, step, rows, num_columns):
    """The counter-based noise: a function of its integer key only."""
    u64 = np.uint64
    key = _mix32(u64(seed) & M32) ^ (u64(salt) & M32)
    key = _mix32(_mix32(key) ^ (u64(step) & M32))
    rows = np.asarray(rows, dtype=np.uint64)
    row_key = _mix32(_mix32(key ^ (rows & M32)) ^ (rows >> u64(32)))
    cols = np.arange(num_columns, dtype=np.uint64)
    col_key = _mix32(((cols + u64(1)) * u64(0x1E3779B9)) & M32)
    bits = _mix32(row_key[:, None] ^ col_key[None, :])
    return (bits >> u64(8)).astype(np.float32) * np.float32(2.0**-24)


def round_half_up(x):
    """floor(x + 0.5), evaluated exactly via the exact fractional part."""
    x = np.asarray(x, dtype=np.float32)
    low = np.floor(x)
    return np.where(x - low >= 0.5, low + 1, low).astype(np.float32)


def stochastic_round(x, u):
    x = np.asarray(x, dtype=np.float32)
    low = np.floor(x)
    return (low + (u < x - low)).astype(np.float32)


def quantize(w, step, bits, rounding, noise=None):
    lo, hi = code_range(bits)
    v = (np.asarray(w, np.float32) / step).astype(np.float32)
    r = round_half_up(v) if rounding == "deterministic" else \
        stochastic_round(v, noise)
    return np.clip(r, lo, hi).astype(np.int32)


def lsq_factor(w, step, bits):
    lo, hi = code_range(bits)
    v = (w / step).astype(np.float32)
    return np.where(v <= lo, np.float32(lo),
                    np.where(v >= hi, np.float32(hi),
                             round_half_up(v) - v)).astype(np.float32)


class TableRef:
    """One table's state and one optimizer step, exactly as specified."""

    def __init__(self, codes, step, bits, per_row, learn, rounding, seed,
                 salt, emb_opt, step_opt, lr, step_lr, beta_1=0.9,
                 beta_2=0.999, eps=1e-8, step_eps=1e-12, min_step=1e-8):
        self.codes = codes.astype(np.int32)
        self.step = step.astype(np.float32)
        v, d = codes.shape
        self.bits, self.per_row, self.learn = bits, per_row, learn
        self.rounding, self.seed, self.salt = rounding, seed, salt
        self.emb_opt, self.step_opt = emb_opt, step_opt
        self.lr, self.step_lr = lr, step_lr
        self.b1, self.b2, self.eps, self.step_eps = beta_1, beta_2, eps, \
            step_eps
        self.min_step = min_step
        self.t = 0
        zeros = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        self.acc = zeros(v, 1) if emb_opt == "rowwise_adagrad" else zeros(v, d)
        self.m, self.v = zeros(v, d), zeros(v, d)
        srows = v if per_row else 1
        self.sm, self.sv, self.sacc = zeros(srows, 1), zeros(srows, 1), \
            zeros(srows, 1)

    def step_rows(self, ids):
        return self.step[ids] if self.per_row else self.step

    def apply(self, ids, grads, second_pass=None):
        """`ids` [N], `grads` [N, D]: duplicates summed, rows updated.

        `second_pass(uniq, rows)` (the two-pass step): given the touched
        rows fake-quantized at `Q_D(w'; Δ)`, returns the second pass's
        gradients `[N, D]` for `ids`; Δ then learns from their sums `ĝ`.
        """
        uniq, inverse = np.unique(ids, return_inverse=True)
        g = np.zeros((len(uniq), grads.shape[1]), np.float32)
        np.add.at(g, inverse, grads.astype(np.float32))
        if not np.all(np.isfinite(g)):
            return uniq, None  # whole step skipped
        t = np.float32(self.t + 1)
        delta = self.step_rows(uniq)
        w = (self.codes[uniq].astype(np.float32) * delta).astype(np.float32)
        f32 = np.float32
        if self.emb_opt == "sgd":
            w2 = w - f32(self.lr) * g
        elif self.emb_opt == "rowwise_adagrad":
            a = self.acc[uniq] + np.mean(g * g, axis=1, keepdims=True,
                                         dtype=np.float32)
            self.acc[uniq] = a
            w2 = w - f32(self.lr) * g / (np.sqrt(a) + f32(self.eps))
        elif self.emb_opt == "adagrad":
            a = self.acc[uniq] + g * g
            self.acc[uniq] = a
            w2 = w - f32(self.lr) * g / (np.sqrt(a) + f32(self.eps))
        else:  # lazy_adam
            m = f32(self.b1) * self.m[uniq] + f32(1 - self.b1) * g
            v = f32(self.b2) * self.v[uniq] + f32(1 - self.b2) * g * g
            self.m[uniq], self.v[uniq] = m, v
            mh = m / (f32(1) - np.power(f32(self.b1), t))
            vh = v / (f32(1) - np.power(f32(self.b2), t))
            w2 = w - f32(self.lr) * mh / (np.sqrt(vh) + f32(self.eps))
        w2 = w2.astype(np.float32)
        new_delta = delta
        if self.learn and second_pass is not None:
            fake = (quantize(w2, delta, self.bits, "deterministic")
                    * delta).astype(np.float32)
            g = np.zeros_like(g)
            np.add.at(g, inverse, second_pass(uniq, fake).astype(np.float32))
        if self.learn:
            lo, hi = code_range(self.bits)
            n = w.shape[1] if self.per_row else self.codes.size
            gamma = f32(1.0 / np.sqrt(n * hi))
            gs = gamma * np.sum(g * lsq_factor(w2, delta, self.bits), axis=1,
                                keepdims=True, dtype=np.float32)
            if not self.per_row:
                gs = np.sum(gs, axis=0, keepdims=True, dtype=np.float32)
            sl = slice(None) if not self.per_row else uniq
            if self.step_opt == "sgd":
                new_delta = delta - f32(self.step_lr) * gs
            elif self.step_opt == "rowwise":
                ms = np.mean(g * g, axis=1, keepdims=True, dtype=np.float32)
                if not self.per_row:
                    ms = np.mean(g * g, dtype=np.float32).reshape(1, 1)
                a = self.sacc[sl] + ms
                self.sacc[sl] = a
                new_delta = delta * (f32(1) - f32(self.step_lr) * (
                    gs / (np.sqrt(a) + f32(self.step_eps))))
            elif self.step_opt == "adagrad":
                a = self.sacc[sl] + gs * gs
                self.sacc[sl] = a
                new_delta = delta - f32(self.step_lr) * gs / (
                    np.sqrt(a) + f32(self.step_eps))
            else:
                m = f32(self.b1) * self.sm[sl] + f32(1 - self.b1) * gs
                v = f32(self.b2) * self.sv[sl] + f32(1 - self.b2) * gs * gs
                self.sm[sl], self.sv[sl] = m, v
                mh = m / (f32(1) - np.power(f32(self.b1), t))
                vh = v / (f32(1) - np.power(f32(self.b2), t))
                new_delta = delta - f32(self.step_lr) * mh / (
                    np.sqrt(vh) + f32(self.step_eps))
            new_delta = np.maximum(new_delta, f32(self.min_step)).astype(
                np.float32)
            if self.per_row:
                self.step[uniq] = new_delta
            else:
                self.step[...] = new_delta
        noise = None
        if self.rounding == "stochastic":
            noise = hash_uniform(self.seed, self.salt, self.t, uniq,
                                 w.shape[1])
        scaled = (w2 / new_delta).astype(np.float32)
        self.codes[uniq] = quantize(w2, new_delta, self.bits, self.rounding,
                                    noise)
        self.t += 1
        return uniq, (scaled, noise)
