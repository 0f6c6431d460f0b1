"""Classifier-free guidance on the conditional digits model: class accuracy and the accuracy/diversity trade-off.

Loads (or trains once, then caches) ``load_or_train("digits-cond")``, draws ``--per-class`` samples of every digit
at each guidance weight w (eq-cfg: ε̃ = ε_u + w (ε_c − ε_u); w = 0 unconditional, w = 1 plain conditional) and
measures them with the digits classifier of :func:`tinyddpm.digits_metrics`, every number beside the same
quantity on real digits:

- overall class accuracy at ``--default-w`` and per-class accuracy at every w (real: the classifier on the 297
  test digits);
- for each w: class accuracy, confident fraction (top probability ≥ 0.9), Fréchet distance of classifier features
  to the test digits (floor: as many real train digits vs the test digits) and within-class diversity, the mean
  pairwise distance between the features of samples of the same class, averaged over the ten classes
  (real: the test digits).

All w start from the same noise (one seed), so the columns differ by guidance only.

    python benchmarks/guidance_digits.py                                   # 100 per class, DDIM 50, w = 0 1 2 3 5
    python benchmarks/guidance_digits.py --per-class 200 --w 1 1.5 2 3 --default-w 1.5
"""

from __future__ import annotations

import argparse
import time

import torch

import tinyddpm as td


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=100, help="samples per digit and per w (default 100)")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0], help="guidance weights to sweep")
    p.add_argument("--default-w", type=float, default=2.0, help="the guided default to report (default 2)")
    p.add_argument("--sampler", default="ddim", choices=sorted(td.SAMPLERS), help="sampler (default ddim)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.per_class < 2:
        p.error("--per-class must be at least 2 (diversity needs pairs)")
    if a.threads is not None:
        torch.set_num_threads(a.threads)

    t0 = time.time()
    ckpt = td.load_or_train("digits-cond")
    clf = td.digits_classifier()
    print(f"model: {ckpt.path} ({td.count_parameters(ckpt.model):,} parameters, {ckpt.step} steps, "
          f"label dropout {ckpt.train.label_dropout}), loaded in {time.time() - t0:.1f} s")
    print(f"classifier test accuracy {clf.test_accuracy:.3f}; sampler {a.sampler}, {a.steps} steps, "
          f"{a.per_class} samples per digit, seed {a.seed}")

    labels = torch.arange(10).repeat_interleave(a.per_class)
    test = td.load_dataset("digits", split="test")
    div_real = td.within_class_diversity(test.x, test.labels, classifier=clf)
    ws = list(dict.fromkeys([*a.w, a.default_w]))
    results, floors = {}, None
    for w in ws:
        t1 = time.time()
        x = ckpt.sample(len(labels), y=labels, guidance=w, sampler=a.sampler, steps=a.steps,
                        generator=torch.Generator().manual_seed(a.seed),
                        batch_size=a.batch_size)
        m = td.digits_metrics(x, labels, classifier=clf)
        m["diversity"] = td.within_class_diversity(x, labels, classifier=clf)
        m["seconds"] = time.time() - t1
        results[w] = m
        floors = m

    d = results[a.default_w]
    print(f"\nclass accuracy at w = {a.default_w:g}: {d['class_accuracy']:.3f} over {len(labels)} samples "
          f"(classifier on real test digits: {floors['class_accuracy_floor']:.3f})")
    print("\nper-class accuracy")
    print("digit         " + " ".join(f"{k:>5d}" for k in range(10)))
    for w in ws:
        print(f"w = {w:<9g} " + " ".join(f"{v:5.2f}" for v in results[w]["per_class_accuracy"]))
    print("real digits   " + " ".join(f"{v:5.2f}" for v in floors["per_class_accuracy_floor"]))

    print(f"\n{'w':>5s} {'accuracy':>9s} {'confident':>10s} {'FD':>7s} {'diversity':>10s} {'sample s':>9s}")
    for w in ws:
        m = results[w]
        print(f"{w:5.2f} {m['class_accuracy']:9.3f} {m['confident']:10.3f} {m['fd']:7.2f} {m['diversity']:10.2f} "
              f"{m['seconds']:9.1f}")
    print(f"{'real':>5s} {floors['class_accuracy_floor']:9.3f} {floors['confident_floor']:10.3f} "
          f"{floors['fd_floor']:7.2f} {div_real:10.2f}")
    print("real: accuracy / confident / diversity of the 297 test digits; FD floor = "
          f"{min(len(labels), 1500)} train digits vs the test digits")


if __name__ == "__main__":
    main()
