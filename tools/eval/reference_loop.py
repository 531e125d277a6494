#!/usr/bin/env python3
"""Python reference of edgemt's replay loop (onnxruntime + numpy), for side-by-side comparison.

    reference_loop.py --model models/hapt_mlp.onnx RECORDING [--eval HOLDOUT] [--seed N]
                      [--report OUT.json] [--config config/edgemt.toml] [--threads N]
                      [--no-guard]

Mirrors src/replay.rs and src/learn/*.rs step for step:

* replay: the recording is cut into chunks of [replay] batch (32); each chunk is embedded in
  one backbone pass and scored by the frozen pretrained (source) head in one product. Then,
  sample by sample: the teacher head predicts the sample's embedding (argmax of its softmax),
  both predictions are scored against "truth", the learner observes the sample, and when due
  the learner takes one step. The timer covers exactly this loop (not model load, recording
  parse, learner construction or the holdout evaluation), as edgemt's does.
* learner.observe: labeled samples go to a per-class ring (32 each), the others to one ring of
  512 slots (raw input + clean embedding + truth).
* learner.due: at least train_every (4) samples since the last step and some buffered data.
* learner.step: 16 labeled (class uniformly among the classes present, then a slot), 32
  unlabeled drawn without replacement from the ring; teacher softmax on the clean
  embeddings -> distribution alignment (running mean, momentum 0.99, uniform target) ->
  threshold 0.9; sigmoid ramp-up of lambda and alpha over 50 steps; two augmentations
  (time shift <= 4 with edge repeat, per-channel gain N(1, 0.1), jitter 0.1 * channel std)
  of each unlabeled sample embedded in ONE backbone pass of 2 * 32; the hand-written
  loss/gradient of loss.rs (mean CE + lambda * CE on accepted / N_u + alpha * student-student
  squared softmax difference / N_u); non-finite loss or gradient skips the step; global-norm
  clipping at 5; Adam (0.9, 0.999, 1e-8), lr 0.003; EMA teacher every step with Mean
  Teacher's warm-up min(0.99, (1+t)/(10+t)).
* rollback guard (learn/guard.rs, [guard], on by default): every label is also filed as
  pending; every 10 steps the teacher is judged (collapse of prediction entropy on the
  unlabeled ring, misleading pending labels, regression on trusted labels vs the last good
  teacher) and the learner reverts to the last good state on a failure. --no-guard disables it.
* --config reads [learn], [augment], [guard] and [replay] of an edgemt TOML (other sections
  are ignored); without it the defaults of config/edgemt.toml apply.

The random draws come from numpy's default_rng(seed), not edgemt's xoshiro256++, so runs
match edgemt in distribution, not bit for bit. All head arithmetic is float32, as in edgemt.

--threads 1 (default) runs onnxruntime with intra_op_num_threads = inter_op_num_threads = 1
(edgemt's tract backbone is single-threaded); --threads 0 keeps onnxruntime's defaults.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np

F32 = np.float32

# Defaults of config/edgemt.toml ([learn], [augment], [replay]).
LEARN = dict(
    lambda_pseudo=1.0,
    alpha_consistency=1.0,
    confidence_threshold=0.9,
    consistency="student",
    rampup_steps=50,
    optimizer="adam",
    learning_rate=0.003,
    momentum=0.9,
    anchor=0.0,
    max_grad_norm=5.0,
    ema_decay=0.99,
    ema_every=1,
    ema_warmup=True,
    train_every=4,
    batch_labeled=16,
    batch_unlabeled=32,
    labeled_per_class=32,
    unlabeled_capacity=512,
    balance="distribution_alignment",
    alignment_momentum=0.99,
)
AUGMENT = dict(jitter=0.1, scale=0.1, max_shift=4, time_axis=None)
REPLAY = dict(batch=32, timeline_every=25, seed=0)
GUARD = dict(enabled=True, holdout_every=0, min_pending=3, min_agreement=0.3,
             check_every_steps=10, margin=0.1, min_trusted=8, capacity=256,
             collapse_ratio=0.5)


# ----------------------------------------------------------------------------------------
# Model: backbone (onnxruntime, output "embedding") and the linear head from initializers.


class Classifier:
    def __init__(self, path, threads):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        proto = onnx.load(path)
        init = {t.name: t for t in proto.graph.initializer}
        # Gemm with transB=1: logits = e @ W.T + b, W [classes, embedding].
        self.weight = numpy_helper.to_array(init["head.weight"]).astype(F32)
        self.bias = numpy_helper.to_array(init["head.bias"]).astype(F32)
        inp = next(i for i in proto.graph.input if i.name not in init)
        self.input_name = inp.name
        self.input_shape = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
        self.sample_len = int(np.prod(self.input_shape))
        self.classes, self.embedding_dim = self.weight.shape
        del proto, init
        so = ort.SessionOptions()
        if threads > 0:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = threads
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self._outputs = ["embedding"]

    def embed(self, x):
        """x: [batch, sample_len] float32 -> [batch, embedding_dim] float32."""
        n = x.shape[0]
        if n == 0:  # edgemt's embed_into returns early for an empty batch
            return np.zeros((0, self.embedding_dim), F32)
        x = x.reshape([n] + self.input_shape)
        return self.sess.run(self._outputs, {self.input_name: x})[0]


# ----------------------------------------------------------------------------------------
# Recordings (stream/recording.rs + stream/sample.rs): one JSON object per line, bad lines
# counted and skipped.


def read_recording(path, sample_len, classes):
    xs, labels, truths = [], [], []
    rejected = 0

    def cls(v):
        if v is None:
            return -1
        if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v < classes):
            raise ValueError("class out of range")
        return v

    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                x = np.asarray(obj["x"], dtype=F32).reshape(-1)
                if x.size != sample_len or not np.isfinite(x).all():
                    raise ValueError("bad x")
                label, truth = cls(obj.get("label")), cls(obj.get("truth"))
                ts = obj.get("ts")
                if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))
                                       or not math.isfinite(ts)):
                    raise ValueError("bad ts")
            except (ValueError, KeyError, TypeError, AttributeError):
                rejected += 1
                continue
            xs.append(x)
            labels.append(label)
            truths.append(truth)
    x = np.stack(xs) if xs else np.zeros((0, sample_len), F32)
    return x, labels, truths, rejected


# ----------------------------------------------------------------------------------------
# Head (learn/head.rs)


def softmax_rows(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Head:
    __slots__ = ("weight", "bias")

    def __init__(self, weight, bias):
        self.weight = weight.copy()
        self.bias = bias.copy()

    def logits(self, e):
        return e @ self.weight.T + self.bias

    def probs(self, e):
        return softmax_rows(self.logits(e))


# ----------------------------------------------------------------------------------------
# Buffers (learn/buffer.rs)


class SampleRing:
    def __init__(self, capacity, sample_len, dim):
        self.inputs = np.zeros((capacity, sample_len), F32)
        self.embeddings = np.zeros((capacity, dim), F32)
        self.truth = np.full(capacity, -1, np.int64)
        self.capacity = capacity
        self.len = 0
        self.next = 0

    def push(self, x, e, truth):
        if self.capacity == 0:
            return
        s = self.next
        self.inputs[s] = x
        self.embeddings[s] = e
        self.truth[s] = truth
        self.next = (s + 1) % self.capacity
        self.len = min(self.len + 1, self.capacity)


class LabeledBuffer:
    def __init__(self, classes, per_class, sample_len, dim):
        self.rings = [SampleRing(per_class, sample_len, dim) for _ in range(classes)]
        self.count = 0

    def push(self, x, e, label):
        r = self.rings[label]
        self.count += r.len < r.capacity
        r.push(x, e, label)

    def is_empty(self):
        return self.count == 0

    def sample(self, n, rng):
        """n (class, slot) pairs: a class uniformly among those present, then a slot in it."""
        present = [c for c, r in enumerate(self.rings) if r.len > 0]
        if not present:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        classes = np.asarray(present)[rng.integers(len(present), size=n)]
        lens = np.array([self.rings[c].len for c in classes])
        slots = (rng.random(n) * lens).astype(np.int64)
        return classes, slots


# ----------------------------------------------------------------------------------------
# Pseudo-labels (learn/pseudo.rs)


class PseudoLabeler:
    def __init__(self, classes, threshold, balance, momentum):
        self.threshold = F32(threshold)
        self.balance = balance
        self.momentum = F32(momentum)
        self.running = np.full(classes, 1.0 / classes, F32)
        self.target = self.running.copy()

    def label(self, probs):
        """Aligns probs in place; returns (class per row, accepted mask)."""
        if self.balance == "distribution_alignment" and probs.shape[0] > 0:
            self.running = self.running * self.momentum + probs.mean(axis=0) * (F32(1) - self.momentum)
            ratio = self.target / np.maximum(self.running, F32(1e-6))
            probs *= ratio
            probs /= probs.sum(axis=1, keepdims=True)
        cls = probs.argmax(axis=1)
        conf = probs[np.arange(probs.shape[0]), cls]
        return cls, conf >= self.threshold


# ----------------------------------------------------------------------------------------
# Augmentation (learn/augment.rs): jitter, per-channel gain, time shift with edge repeat.


class Augmenter:
    def __init__(self, cfg, sample_shape):
        shape = list(sample_shape)
        if len(shape) == 2:
            a, b = shape
            time = cfg["time_axis"] if cfg["time_axis"] is not None else (0 if a >= b else 1)
            self.transpose = time == 1
            self.steps, self.channels = (a, b) if time == 0 else (b, a)
        else:
            self.transpose = False
            self.steps, self.channels = int(np.prod(shape)), 1
        self.shape = shape
        self.jitter = F32(cfg["jitter"])
        self.scale = F32(cfg["scale"])
        self.max_shift = int(cfg["max_shift"])
        self.t = np.arange(self.steps)

    def apply(self, x, rng):
        """x: [n, sample_len] -> n independent augmentations, [n, sample_len]."""
        n = x.shape[0]
        if self.transpose:
            v = x.reshape(n, self.channels, self.steps).transpose(0, 2, 1)
        else:
            v = x.reshape(n, self.steps, self.channels)
        inv = F32(1.0 / self.steps)
        mean = v.sum(axis=1) * inv
        var = np.einsum("ntc,ntc->nc", v, v) * inv - mean * mean
        std = np.sqrt(np.maximum(var, F32(0)))
        if self.max_shift > 0:
            shift = rng.integers(-self.max_shift, self.max_shift + 1, size=n)
        else:
            shift = np.zeros(n, np.int64)
        src = np.clip(self.t[None, :] - shift[:, None], 0, self.steps - 1)
        shifted = v[np.arange(n)[:, None], src]
        gain = F32(1) + self.scale * rng.standard_normal((n, 1, self.channels), dtype=F32)
        noise = (self.jitter * std)[:, None, :]
        out = shifted * gain + noise * rng.standard_normal(shifted.shape, dtype=F32)
        if self.transpose:
            out = out.transpose(0, 2, 1)
        return np.ascontiguousarray(out, F32).reshape(n, -1)


# ----------------------------------------------------------------------------------------
# Loss and gradient (learn/loss.rs)


def cross_entropy_grad(p, targets, accepted, denom, scale):
    """Sum over accepted rows of -log p[target] / denom, and dz = scale (p - onehot) / denom."""
    rows = np.nonzero(accepted)[0] if accepted is not None else np.arange(p.shape[0])
    t = targets[rows]
    loss = -np.log(np.maximum(p[rows, t], F32(1e-12)).astype(np.float64)).sum() / denom
    dz = p.copy()
    dz[rows, t] -= F32(1)
    dz *= F32(scale / denom)
    if accepted is not None:
        dz[~accepted] = 0
    return F32(loss), dz


def softmax_backward(p, g):
    dot = (p * g).sum(axis=1, keepdims=True)
    return p * (g - dot)


def loss_and_grad(student, teacher, emb_l, labels, emb_u, pseudo_cls, pseudo_ok, aug_a, aug_b,
                  lam, alpha, mode):
    gw = np.zeros_like(student.weight)
    gb = np.zeros_like(student.bias)
    sup = pseudo = cons = F32(0)

    if emb_l.shape[0] > 0:
        p = student.probs(emb_l)
        sup, dz = cross_entropy_grad(p, labels, None, F32(emb_l.shape[0]), F32(1))
        gw += dz.T @ emb_l
        gb += dz.sum(axis=0)

    n_u = emb_u.shape[0]
    if n_u > 0 and lam > 0 and pseudo_ok.any():
        p = student.probs(emb_u)
        pseudo, dz = cross_entropy_grad(p, pseudo_cls, pseudo_ok, F32(n_u), lam)
        gw += dz.T @ emb_u
        gb += dz.sum(axis=0)

    n_c = aug_a.shape[0]
    if n_c > 0 and alpha > 0:
        pa = student.probs(aug_a)
        pb = student.probs(aug_b) if mode == "student" else teacher.probs(aug_b)
        diff = pa - pb
        cons = F32((diff * diff).sum() / F32(n_c))
        g = diff * F32(2 * alpha / F32(n_c))
        dz = softmax_backward(pa, g)
        gw += dz.T @ aug_a
        gb += dz.sum(axis=0)
        if mode == "student":
            dz = softmax_backward(pb, -g)
            gw += dz.T @ aug_b
            gb += dz.sum(axis=0)
    total = F32(sup + lam * pseudo + alpha * cons)
    return (sup, pseudo, cons, total), gw, gb


# ----------------------------------------------------------------------------------------
# Optimizers and EMA (learn/optim.rs)


class Adam:
    def __init__(self, head):
        self.b1, self.b2, self.eps = F32(0.9), F32(0.999), F32(1e-8)
        self.m = [np.zeros_like(head.weight), np.zeros_like(head.bias)]
        self.v = [np.zeros_like(head.weight), np.zeros_like(head.bias)]
        self.t = 0

    def step(self, head, grads, lr):
        self.t += 1
        b1, b2, eps, lr = self.b1, self.b2, self.eps, F32(lr)
        c1 = F32(1) - b1 ** self.t
        c2 = F32(1) - b2 ** self.t
        for p, g, m, v in zip((head.weight, head.bias), grads, self.m, self.v):
            m *= b1
            m += (F32(1) - b1) * g
            v *= b2
            v += (F32(1) - b2) * g * g
            p -= lr * (m / c1) / (np.sqrt(v / c2) + eps)


class Sgd:
    def __init__(self, head, momentum):
        self.mu = F32(momentum)
        self.vel = [np.zeros_like(head.weight), np.zeros_like(head.bias)]

    def step(self, head, grads, lr):
        for p, g, v in zip((head.weight, head.bias), grads, self.vel):
            v *= self.mu
            v += g
            p -= F32(lr) * v


def ema_update(teacher, student, m):
    m = F32(m)
    for t, s in ((teacher.weight, student.weight), (teacher.bias, student.bias)):
        t *= m
        t += (F32(1) - m) * s


def warmed_up_decay(m, t):
    return min(F32(m), F32((1.0 + t) / (10.0 + t)))


def rampup(step, length):
    if length == 0 or step >= length:
        return F32(1)
    x = F32(1) - F32(step) / F32(length)
    return F32(math.exp(-5.0 * x * x))


# ----------------------------------------------------------------------------------------
# Rollback guard (learn/guard.rs)


def round_half_away(x):
    return math.copysign(math.floor(abs(x) + 0.5), x)


def head_accuracy(head, emb, labels):
    pred = head.logits(emb).argmax(axis=1)
    return F32((pred == labels).sum()) / F32(max(1, len(labels)))


def prediction_entropy(head, emb):
    counts = np.bincount(head.logits(emb).argmax(axis=1), minlength=head.weight.shape[0])
    p = counts[counts > 0].astype(F32) / F32(max(1, emb.shape[0]))
    return F32((-p * np.log(p)).sum())


class HeldOut:
    def __init__(self):
        self.embeddings, self.labels = [], []

    def push(self, e, label, capacity):
        self.embeddings.append(e)
        self.labels.append(label)
        excess = len(self.labels) - max(1, capacity)
        if excess > 0:
            del self.embeddings[:excess], self.labels[:excess]

    def matrix(self):
        return np.stack(self.embeddings), np.asarray(self.labels)


class RollbackGuard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.trusted, self.pending = HeldOut(), HeldOut()
        self.labels_seen = 0
        self.rollbacks = 0
        self.checks = 0

    def hold_out(self, e, label):
        """Files a labeled sample; True if it must also be withheld from training."""
        if not self.cfg["enabled"]:
            return False
        self.labels_seen += 1
        self.pending.push(e.copy(), label, self.cfg["capacity"])
        every = self.cfg["holdout_every"]
        return every > 0 and self.labels_seen % every == 0

    def due(self, train_steps):
        return self.cfg["enabled"] and train_steps % max(1, self.cfg["check_every_steps"]) == 0

    def judge(self, teacher, good, source, recent):
        """Returns ("pass" | "worse" | "misleading" | "collapsed", teacher_acc, good_acc)."""
        cfg = self.cfg
        self.checks += 1
        if cfg["collapse_ratio"] > 0 and recent.shape[0] >= 32:
            t, s = prediction_entropy(teacher, recent), prediction_entropy(source, recent)
            if t < F32(cfg["collapse_ratio"]) * s:
                return "collapsed", t, s
        if len(self.trusted.labels) < cfg["min_trusted"]:
            return "pass", F32("nan"), F32("nan")
        if len(self.pending.labels) >= cfg["min_pending"]:
            m, y = self.pending.matrix()
            agreement = head_accuracy(good, m, y)
            if agreement < F32(cfg["min_agreement"]):
                return "misleading", agreement, F32("nan")
        m, y = self.trusted.matrix()
        t, g = head_accuracy(teacher, m, y), head_accuracy(good, m, y)
        fewer_correct = round_half_away(float((g - t) * F32(len(y))))
        if t + F32(cfg["margin"]) < g and fewer_correct >= 2.0:
            return "worse", t, g
        return "pass", t, g

    def promote(self):
        if (len(self.pending.labels) < self.cfg["min_pending"]
                and len(self.trusted.labels) >= self.cfg["min_trusted"]):
            return
        for e, l in zip(self.pending.embeddings, self.pending.labels):
            self.trusted.push(e, l, self.cfg["capacity"])
        self.pending = HeldOut()

    def discard_pending(self):
        self.pending = HeldOut()
        self.rollbacks += 1


# ----------------------------------------------------------------------------------------
# Learner (learn/learner.rs)


class Learner:
    def __init__(self, weight, bias, sample_shape, sample_len, learn, augment, guard, seed):
        self.cfg = learn
        classes, dim = weight.shape
        self.student = Head(weight, bias)
        self.teacher = Head(weight, bias)
        self.source = Head(weight, bias)
        if learn["optimizer"] == "adam":
            self.optimizer = Adam(self.student)
        else:
            self.optimizer = Sgd(self.student, learn["momentum"])
        self.labeled = LabeledBuffer(classes, learn["labeled_per_class"], sample_len, dim)
        self.unlabeled = SampleRing(learn["unlabeled_capacity"], sample_len, dim)
        self.pseudo = PseudoLabeler(classes, learn["confidence_threshold"], learn["balance"],
                                    learn["alignment_momentum"])
        self.augmenter = Augmenter(augment, sample_shape)
        self.rng = np.random.default_rng(seed)
        self.train_steps = 0
        self.ema_updates = 0
        self.skipped_nonfinite = 0
        self.teacher_version = 0
        self.rollbacks = 0
        self.samples_seen = 0
        self.guard = RollbackGuard(guard)
        self.good = None
        self.since_step = 0
        self.train_every = max(1, learn["train_every"])

    def observe(self, x, e, label, truth):
        self.samples_seen += 1
        self.since_step += 1
        if label >= 0:
            if not self.guard.hold_out(e, label):
                self.labeled.push(x, e, label)
        else:
            self.unlabeled.push(x, e, truth)

    def due(self):
        return self.since_step >= self.train_every and (
            not self.labeled.is_empty() or self.unlabeled.len > 0)

    def step(self, classifier):
        """One student step; returns a step report dict, or None if skipped (non-finite)."""
        cfg, rng = self.cfg, self.rng
        self.since_step = 0

        # Labeled batch, class-balanced.
        classes, slots = self.labeled.sample(cfg["batch_labeled"], rng)
        if classes.size:
            emb_l = np.stack([self.labeled.rings[c].embeddings[s] for c, s in zip(classes, slots)])
        else:
            emb_l = np.zeros((0, self.student.weight.shape[1]), F32)

        # Unlabeled batch, drawn without replacement from the ring.
        ring = self.unlabeled
        n_u = min(cfg["batch_unlabeled"], ring.len)
        order = rng.choice(ring.len, size=n_u, replace=False) if n_u else np.zeros(0, np.int64)
        emb_u = ring.embeddings[order]

        # Pseudo-labels from the teacher on the clean samples.
        teacher_probs = self.teacher.probs(emb_u)
        pseudo_cls, pseudo_ok = self.pseudo.label(teacher_probs)

        ramp = rampup(self.train_steps, cfg["rampup_steps"])
        lam = F32(cfg["lambda_pseudo"]) * ramp
        alpha = F32(cfg["alpha_consistency"]) * ramp

        # Two augmentations of each unlabeled sample, embedded in one backbone pass.
        n_aug = n_u if alpha > 0 else 0
        if n_aug:
            x = ring.inputs[order[:n_aug]]
            aug_inputs = self.augmenter.apply(np.concatenate([x, x]), rng)
        else:
            aug_inputs = np.zeros((0, ring.inputs.shape[1]), F32)
        aug_emb = classifier.embed(aug_inputs)
        aug_a, aug_b = aug_emb[:n_aug], aug_emb[n_aug:]

        losses, gw, gb = loss_and_grad(self.student, self.teacher, emb_l, classes, emb_u,
                                       pseudo_cls, pseudo_ok, aug_a, aug_b, lam, alpha,
                                       cfg["consistency"])
        sup, pseudo, cons, total = losses
        if cfg["anchor"] > 0:
            a = F32(cfg["anchor"])
            dw = self.student.weight - self.source.weight
            db = self.student.bias - self.source.bias
            gw += a * dw
            gb += a * db
            total = F32(total + F32(0.5) * a * ((dw * dw).sum() + (db * db).sum()))

        accepted = int(pseudo_ok.sum())
        truth = ring.truth[order][pseudo_ok]
        with_truth = truth >= 0
        report = dict(sup=float(sup), pseudo=float(pseudo), consistency=float(cons),
                      offered=n_u, accepted=accepted,
                      accepted_with_truth=int(with_truth.sum()),
                      accepted_correct=int((truth[with_truth] == pseudo_cls[pseudo_ok][with_truth]).sum()))

        if not np.isfinite(total) or not (np.isfinite(gw).all() and np.isfinite(gb).all()):
            self.skipped_nonfinite += 1
            return None
        norm = F32(math.sqrt(float((gw * gw).sum() + (gb * gb).sum())))
        if cfg["max_grad_norm"] > 0 and norm > cfg["max_grad_norm"]:
            s = F32(cfg["max_grad_norm"]) / norm
            gw *= s
            gb *= s
        self.optimizer.step(self.student, (gw, gb), cfg["learning_rate"])
        self.train_steps += 1
        if self.train_steps % max(1, cfg["ema_every"]) == 0:
            m = warmed_up_decay(cfg["ema_decay"], self.ema_updates) if cfg["ema_warmup"] else cfg["ema_decay"]
            ema_update(self.teacher, self.student, m)
            self.ema_updates += 1
            self.teacher_version += 1
        report["rollback"] = None
        if self.guard.due(self.train_steps):
            report["rollback"] = self.check_guard()
        return report

    def current_state(self):
        return copy.deepcopy((self.student, self.teacher, self.optimizer, self.labeled,
                              self.pseudo.running))

    def check_guard(self):
        if self.good is None:
            fresh = Adam(self.source) if self.cfg["optimizer"] == "adam" else Sgd(
                self.source, self.cfg["momentum"])
            self.good = (Head(self.source.weight, self.source.bias),
                         Head(self.source.weight, self.source.bias), fresh,
                         copy.deepcopy(self.labeled), self.pseudo.running.copy())
        recent = self.unlabeled.embeddings[:self.unlabeled.len]
        verdict, t, g = self.guard.judge(self.teacher, self.good[1], self.source, recent)
        if verdict == "pass":
            self.guard.promote()
            if not (t < g):
                self.good = self.current_state()
            return None
        (self.student, self.teacher, self.optimizer, self.labeled,
         self.pseudo.running) = copy.deepcopy(self.good)
        self.guard.discard_pending()
        self.rollbacks += 1
        self.teacher_version += 1
        return verdict


# ----------------------------------------------------------------------------------------
# Replay (replay.rs)


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def frac(a, b):
    return a / b if b else 0.0


def replay(classifier, recording, holdout, seed, learn, augment, guard, rcfg):
    x_all, labels, truths, rejected = read_recording(recording, classifier.sample_len,
                                                     classifier.classes)
    learner = Learner(classifier.weight, classifier.bias, classifier.input_shape,
                      classifier.sample_len, learn, augment, guard, seed)
    batch, every = rcfg["batch"], rcfg["timeline_every"]
    source = learner.source  # never replaced; the teacher is (by a rollback), so not cached

    started = time.perf_counter()
    n = x_all.shape[0]
    predictions = []
    scored = teacher_correct = source_correct = 0
    pseudo = dict(offered=0, accepted=0, accepted_correct=0, accepted_with_truth=0)
    win = dict(scored=0, t=0, s=0, steps=0, sup=0.0, pseudo=0.0, cons=0.0, offered=0, accepted=0)
    timeline = []
    for start in range(0, n, batch):
        chunk = x_all[start:start + batch]
        emb = classifier.embed(chunk)
        source_class = source.logits(emb).argmax(axis=1)
        for i in range(chunk.shape[0]):
            done = start + i + 1
            row = emb[i:i + 1]
            p = learner.teacher.probs(row)[0]
            tc = int(p.argmax())
            predictions.append((tc, float(p[tc])))
            truth = truths[start + i]
            if truth >= 0:
                scored += 1
                win["scored"] += 1
                ok_t, ok_s = tc == truth, int(source_class[i]) == truth
                teacher_correct += ok_t
                source_correct += ok_s
                win["t"] += ok_t
                win["s"] += ok_s
            learner.observe(chunk[i], emb[i], labels[start + i], truth)
            if learner.due():
                step = learner.step(classifier)
                if step is not None:
                    win["steps"] += 1
                    win["sup"] += step["sup"]
                    win["pseudo"] += step["pseudo"]
                    win["cons"] += step["consistency"]
                    win["offered"] += step["offered"]
                    win["accepted"] += step["accepted"]
                    for k in pseudo:
                        pseudo[k] += step[k]
            if done % every == 0 or done == n:
                st = win["steps"]
                timeline.append(dict(
                    sample=done,
                    scored=win["scored"],
                    teacher_accuracy=frac(win["t"], win["scored"]),
                    source_accuracy=frac(win["s"], win["scored"]),
                    loss_sup=win["sup"] / st if st else 0.0,
                    loss_pseudo=win["pseudo"] / st if st else 0.0,
                    loss_consistency=win["cons"] / st if st else 0.0,
                    acceptance=frac(win["accepted"], win["offered"])))
                win = dict(scored=0, t=0, s=0, steps=0, sup=0.0, pseudo=0.0, cons=0.0,
                           offered=0, accepted=0)
    elapsed = time.perf_counter() - started

    ev = evaluate(classifier, learner, holdout, batch) if holdout else None
    report = dict(
        samples=n,
        labeled=sum(1 for l in labels if l >= 0),
        scored=scored,
        rejected=rejected,
        prequential_accuracy=dict(teacher=frac(teacher_correct, scored),
                                  source=frac(source_correct, scored)),
    )
    if ev is not None:
        report["eval"] = ev
    report.update(
        pseudo_labels=pseudo,
        train_steps=learner.train_steps,
        ema_updates=learner.ema_updates,
        teacher_version=learner.teacher_version,
        rollbacks=learner.rollbacks,
        skipped_nonfinite=learner.skipped_nonfinite,
        checkpoints_written=0,
        throughput_samples_per_s=n / elapsed if elapsed > 0 else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        seed=seed,
        timeline=timeline,
    )
    return report, learner, predictions


def evaluate(classifier, learner, path, batch):
    x, _, truths, _ = read_recording(path, classifier.sample_len, classifier.classes)
    keep = np.array([t >= 0 for t in truths], bool)
    x, y = x[keep], np.array(truths, np.int64)[keep]
    if x.shape[0] == 0:
        sys.exit(f"error: holdout {path} has no samples with \"truth\", so it cannot be scored")
    heads = (learner.teacher, learner.student, learner.source)
    correct = [0, 0, 0]
    for start in range(0, x.shape[0], batch):
        emb = classifier.embed(x[start:start + batch])
        yy = y[start:start + batch]
        for h, head in enumerate(heads):
            correct[h] += int((head.logits(emb).argmax(axis=1) == yy).sum())
    n = x.shape[0]
    return dict(samples=n, teacher_accuracy=correct[0] / n, student_accuracy=correct[1] / n,
                source_accuracy=correct[2] / n)


def print_summary(r):
    print(f"samples {r['samples']} (labeled {r['labeled']}, scored {r['scored']}, "
          f"rejected {r['rejected']})")
    pa = r["prequential_accuracy"]
    print(f"prequential accuracy: teacher {pa['teacher']:.4f}, pretrained {pa['source']:.4f}")
    e = r.get("eval")
    if e:
        print(f"holdout ({e['samples']} samples): teacher {e['teacher_accuracy']:.4f}, "
              f"student {e['student_accuracy']:.4f}, pretrained {e['source_accuracy']:.4f} "
              f"({100 * (e['teacher_accuracy'] - e['source_accuracy']):+.1f} points)")
    p = r["pseudo_labels"]
    print(f"pseudo-labels: {p['offered']} offered, {p['accepted']} accepted "
          f"({100 * frac(p['accepted'], p['offered']):.1f}%), {p['accepted_correct']} of those correct")
    print(f"{r['train_steps']} train steps, {r['ema_updates']} EMA updates, "
          f"{r['rollbacks']} rollbacks, "
          f"{r['throughput_samples_per_s']:.0f} samples/s, "
          f"peak RSS {r['peak_rss_bytes'] / (1024 * 1024):.1f} MiB")


def load_config(path):
    import tomllib

    learn, augment, guard, rcfg = dict(LEARN), dict(AUGMENT), dict(GUARD), dict(REPLAY)
    if path:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
        for section, d in (("learn", learn), ("augment", augment), ("guard", guard),
                           ("replay", rcfg)):
            for k, v in cfg.get(section, {}).items():
                if k not in d:
                    sys.exit(f"error: unknown key [{section}] {k}")
                d[k] = v
    return learn, augment, guard, rcfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("recording")
    ap.add_argument("--eval", dest="holdout")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--report")
    ap.add_argument("--config", help="edgemt TOML; [learn], [augment], [replay] are honoured "
                    "(default: the values of config/edgemt.toml)")
    ap.add_argument("--no-guard", action="store_true",
                    help="disable the rollback guard ([guard] enabled = false)")
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra/inter-op threads (default 1; 0 = onnxruntime default)")
    args = ap.parse_args()

    learn, augment, guard, rcfg = load_config(args.config)
    if args.no_guard:
        guard["enabled"] = False
    seed = args.seed if args.seed is not None else rcfg["seed"]
    classifier = Classifier(args.model, args.threads)
    report, _, _ = replay(classifier, args.recording, args.holdout, seed, learn, augment, guard,
                          rcfg)
    print_summary(report)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
