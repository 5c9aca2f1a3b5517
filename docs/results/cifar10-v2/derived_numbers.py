"""The derived numbers of the Results section (power, curve gains, run walls, column gaps) from compare's CSVs
and the committed run files: python docs/results/cifar10-v2/derived_numbers.py"""
import csv, glob, json, math, statistics as st, sys
from scipy import stats

D = __import__("os").path.dirname(__import__("os").path.abspath(__file__))
ROWS = ["no_kd", "conv_only", "inv_only", "two_conv", "two_inv", "one_token_sum", "one_token_mean_prob", "civt"]
WHAT = {"no_kd": "cls, no teacher", "conv_only": "cls + conv", "inv_only": "cls + inv",
        "two_conv": "cls + conv + conv2", "two_inv": "cls + inv + inv2",
        "one_token_sum": "cls, taught by conv and inv (two KL terms)",
        "one_token_mean_prob": "cls, taught by the mean of conv's and inv's probabilities",
        "civt": "cls + conv + inv (CivT)"}
load = lambda p: {r["recipe"]: r for r in csv.DictReader(open(p))}
C, N = load(f"{D}/comparison.csv"), load(f"{D}/vs_no_kd.csv")
f = lambda x: float(x) if x not in ("", None) else float("nan")
def ph(r):
    p = f(r["diff_p_holm"]); return "< 0.001" if p < 0.001 else f"{p:.3f}"
def pr(r):
    p = f(r["diff_p"]); return "< 0.001" if p < 0.001 else f"{p:.3f}"
def d(r): return f"{f(r['diff_mean']):+.2f} [{f(r['diff_ci_low']):+.2f}, {f(r['diff_ci_high']):+.2f}]"
def neg(r):  # civt minus row
    return f"{-f(r['diff_mean']):.2f} [{-f(r['diff_ci_high']):+.2f}, {-f(r['diff_ci_low']):+.2f}]"
def seeds_for(sd, alpha=0.05, effect=0.5):
    for m in range(2, 5000):
        tc = stats.t.ppf(1 - alpha / 2, m - 1); nc = effect / (sd / math.sqrt(m))
        if 1 - stats.nct.cdf(tc, m - 1, nc) + stats.nct.cdf(-tc, m - 1, nc) >= 0.8: return m
out = []
w = out.append
w("| row | tokens and teachers | test top-1 | mean of heads | best-val epoch | Δ vs CivT [95% CI] | p (Holm) | Δ vs no KD [95% CI] | p (Holm) |")
w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in sorted(ROWS, key=lambda n: -f(C[n]["test_top1_mean"])):
    r, q = C[name], N[name]
    hm = "n/a" if r["heads_mean_top1_mean"] == "" else f"{f(r['heads_mean_top1_mean']):.2f} ± {f(r['heads_mean_top1_std']):.2f}"
    dc = ("baseline", "") if name == "civt" else (d(r), ph(r))
    dn = ("baseline", "") if name == "no_kd" else (d(q), ph(q))
    w(f"| `{name}` | {WHAT[name]} | {f(r['test_top1_mean']):.2f} ± {f(r['test_top1_std']):.2f} | {hm} | "
      f"{f(r['best_val_epoch_test_top1_mean']):.2f} | {dc[0]} | {dc[1]} | {dn[0]} | {dn[1]} |")
table = "\n".join(out)

# guards on the prose
for n in ROWS[1:]:
    assert f(N[n]["diff_ci_low"]) > 0, n
for n in ("conv_only", "inv_only"):
    assert f(C[n]["diff_ci_high"]) < 0 and f(C[n]["diff_p"]) < 0.05 < f(C[n]["diff_p_holm"]), n
for n in ("two_conv", "one_token_sum", "one_token_mean_prob"):
    assert f(C[n]["diff_ci_low"]) < 0 < f(C[n]["diff_ci_high"]), n
heads_gap = max(abs(f(C[n]["heads_mean_top1_mean"]) - f(C[n]["test_top1_mean"])) for n in ROWS if C[n]["heads_mean_top1_mean"])
bv_gap = max(abs(f(C[n]["best_val_epoch_test_top1_mean"]) - f(C[n]["test_top1_mean"])) for n in ROWS)
sds = {n: f(C[n]["diff_std"]) for n in ROWS if n != "civt"}
ti = C["two_inv"]
ti_kind = ("excludes 0 in CivT's favour" if f(ti["diff_ci_high"]) < 0 else
           "excludes 0 against CivT" if f(ti["diff_ci_low"]) > 0 else "spans 0")
print(table)
print()
print("heads gap", round(heads_gap, 2), "best-val gap", round(bv_gap, 2))
for n in ROWS:
    if n == "civt": continue
    print(f"{n}: vs civt {d(C[n])} sd {sds[n]:.2f} p {pr(C[n])} holm {ph(C[n])}; seeds 0.5pt: {seeds_for(sds[n])} (Holm/7: {seeds_for(sds[n], 0.05/7)}); vs no_kd {d(N[n])} holm {ph(N[n])}")
print("civt vs no_kd", d(N["civt"]), ph(N["civt"]))
print("two_inv interval", ti_kind, "civt minus two_inv", neg(ti))
print("teachers two_inv", ti["teacher_inv_top1"], ti.get("teacher_inv2_top1"))
print()
for name in ROWS:
    curves = [[json.loads(l)["top1"]["eval"] for l in open(m)] for m in sorted(glob.glob(f"{D}/{name}/seed*/metrics.jsonl"))]
    mean = [st.fmean(c[i] for c in curves) for i in range(30)]
    print(f"{name}: ep10 {mean[9]:.1f} ep20 {mean[19]:.1f} ep25 {mean[24]:.1f} ep30 {mean[29]:.1f}; 10->20 +{mean[19]-mean[9]:.1f}; 20->30 +{mean[29]-mean[19]:.1f}; 25->30 +{mean[29]-mean[24]:.1f}")
tot = 0
for name in ROWS:
    ws = [json.load(open(s))["wall_s"] / 60 for s in sorted(glob.glob(f"{D}/{name}/seed*/summary.json"))]
    tot += sum(ws); print(f"{name}: {', '.join(f'{x:.1f}' for x in ws)}; median {st.median(ws):.1f}")
print(f"students: {tot:.0f} run-min, {tot/120:.1f} h two at a time")
