#!/usr/bin/env python3
"""Breaks edgemt on purpose, one known bug at a time, and checks that the test meant to catch
it fails. Each mutation is a literal replacement that must match exactly once, so a refactor
that moves the code makes this script say so instead of silently testing nothing. A mutant
that does not compile is reported as such, never as caught. Every file is restored
afterwards, whatever happens.

    python3 tools/dev/mutations.py            # every mutation (a rebuild and a test run each)
    python3 tools/dev/mutations.py queue      # only those whose name contains "queue"

Exit status 0 when every mutation was caught. Not part of the test command: it rebuilds the
crate once per mutation (~1-2 min each on 2 cores).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tools/dev/mutations.py

# (name, file, literal to replace, replacement, test filter for `cargo test --test integration`)
MUTATIONS = [
    (
        "window-channels-swapped",
        "src/stream/window.rs",
        "self.ring[slot * channels + c];",
        "self.ring[slot * channels + (c ^ 1).min(channels - 1)];",
        "input_values::",
    ),
    (
        "queue-drops-newest-unlabeled",
        "src/daemon/queue.rs",
        "state.items.iter().position(Droppable::droppable)",
        "state.items.iter().rposition(Droppable::droppable)",
        "queues::",
    ),
    (
        "reset-keeps-the-learned-teacher",
        "src/session.rs",
        "    pub fn reset(&mut self) {\n        self.learner.reset();",
        "    pub fn reset(&mut self) {",
        "daemon::commands_pause_and_resume_training_and_reset_the_teacher",
    ),
    (
        "guard-rolls-back-for-one-sample",
        "src/learn/guard.rs",
        "fewer_correct >= 2.0",
        "fewer_correct >= 1.0",
        "rollback::a_teacher_that_gets_two_more",
    ),
    (
        "guard-never-judges-worse",
        "src/learn/guard.rs",
        "if t + self.cfg.margin < g && fewer_correct >= 2.0",
        "if false && t + self.cfg.margin < g && fewer_correct >= 2.0",
        "rollback::",
    ),
    (
        "feedback-scored-against-the-label-inverted",
        "src/session.rs",
        "let correct = self.recent.predicted[slot] == label;",
        "let correct = self.recent.predicted[slot] != label;",
        "daemon::daemon_predicts_every_sample",
    ),
    (
        "no-last-will",
        "src/daemon/mqtt.rs",
        "opts.set_last_will(",
        "let _ = (",
        "daemon::a_killed_daemon_is_marked_offline",
    ),
    (
        "no-subscription-after-a-reconnect",
        "src/daemon/mqtt.rs",
        "for topic in self.router.topics.inputs() {",
        "for topic in self.router.topics.inputs().into_iter().filter(|_| {\n"
        "    self.shared.counters.mqtt_reconnects_total.load(Relaxed) == 0\n"
        "}) {",
        "daemon::daemon_recovers_by_itself",
    ),
    (
        "checkpoint-written-in-place",
        "src/checkpoint/store.rs",
        "    let path = dir.join(name);\n    let mut tmp = tempfile::Builder::new()",
        "    let path = dir.join(name);\n"
        "    if name.ends_with(\".json\") {\n"
        "        let mut f = std::fs::File::create(&path).map_err(io(&path))?;\n"
        "        for c in bytes.chunks(16) {\n"
        "            f.write_all(c).map_err(io(&path))?;\n"
        "            f.flush().map_err(io(&path))?;\n"
        "            std::thread::sleep(std::time::Duration::from_micros(200));\n"
        "        }\n"
        "        return Ok(());\n"
        "    }\n"
        "    let mut tmp = tempfile::Builder::new()",
        "checkpoints::kill_nine_after_a_restore",
    ),
    (
        "replay-scores-the-teacher-as-the-pretrained-model",
        "src/replay.rs",
        "(source_preds[row].class == truth) as usize,",
        "(p.class == truth) as usize,",
        "replay_cli::the_report_has_every_documented_field",
    ),
    (
        "holdout-scores-the-teacher-as-the-pretrained-model",
        "src/replay.rs",
        "source_accuracy: correct[2] as f64 / n,",
        "source_accuracy: correct[0] as f64 / n,",
        "replay_cli::adaptation_on_the_shifted_target",
    ),
    (
        "optimizer-never-steps",
        "src/learn/learner.rs",
        "            self.cfg.learning_rate,\n        );\n        self.counters.train_steps",
        "            0.0,\n        );\n        self.counters.train_steps",
        "replay_cli::adaptation_on",
    ),
]


def cargo(args, log):
    with open(log, "w") as out:
        return subprocess.run(
            ["cargo", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        ).returncode


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    caught, missed = [], []
    (REPO / "target").mkdir(exist_ok=True)
    for name, rel, old, new, test in MUTATIONS:
        if only and only not in name:
            continue
        path = REPO / rel
        original = path.read_text()
        text = original
        if text.count(old) != 1:
            missed.append(f"{name} (does not apply: the code moved)")
            print(f"== {name}: does not apply", file=sys.stderr)
            continue
        text = text.replace(old, new)
        log = REPO / "target" / f"mutation-{name}.log"
        started = time.time()
        try:
            path.write_text(text)
            built = cargo(["test", "--locked", "--test", "integration", "--no-run"], log)
            if built != 0:
                missed.append(f"{name} (does not compile: {log})")
                print(f"== {name}: does not compile, see {log}", file=sys.stderr)
                continue
            status = cargo(["test", "--locked", "--test", "integration", "--", test], log)
        finally:
            path.write_text(original)
        lines = log.read_text().splitlines()
        failed = [l.split()[1] for l in lines if l.startswith("test ") and l.endswith("FAILED")]
        took = time.time() - started
        if status != 0 and failed:
            caught.append(name)
            print(f"== {name}: caught by {', '.join(failed)} ({took:.0f} s)", file=sys.stderr)
        else:
            missed.append(name)
            print(f"== {name}: NOT caught by {test} ({took:.0f} s, {log})", file=sys.stderr)
    print(f"mutations caught: {len(caught)}, missed: {len(missed)}", file=sys.stderr)
    for m in missed:
        print(f"  missed: {m}", file=sys.stderr)
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
