"""The GPU benchmark's summary: its JSON as tables, each figure beside its target."""

from __future__ import annotations


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def print_table(data: dict) -> None:
    env = data["environment"]
    print(f"\n{env['gpu'] or env['device']} ({env['gpu_memory_gib']} GiB), {env['cpus']} CPUs, torch {env['torch']}, "
          f"CUDA {env['cuda']}, NCCL {env['nccl']}, Ray {env['ray']}, MLflow {env['mlflow']}; {env['mode']} run, "
          f"{data.get('wall_s', '?')} s in all")
    train, engine = data.get("train", {}), data.get("engine", {})
    print("\n| stage | wall s |\n| --- | --- |")
    for stage, seconds in {**{k: v for k, v in data.get("stages", {}).items() if k != "section_s"},
                           "train": train.get("wall_s")}.items():
        print(f"| {stage} | {seconds} |")
    if "epochs" in train:
        print("\n| epoch | img/s inside Ray | FID | floor |\n| --- | --- | --- | --- |")
        for row in train["epochs"]:
            print(f"| {row['epoch']} | {row['img_per_s']:,.0f} | {row['fid']:.3f} | {train['fid_floor']:.3f} |")
        later = train["epochs"][1:] or train["epochs"]
        ray_rate = sum(r["img_per_s"] for r in later) / len(later)
        print("\n| figure | value | target |\n| --- | --- | --- |")
        print(f"| train img/s inside Ray (epochs 2+) / engine alone | {ray_rate:,.0f} / "
              f"{engine.get('img_per_s', float('nan')):,.0f} = {_ratio(ray_rate, engine.get('img_per_s'))} | >= 0.80 |")
        reference = engine.get("seconds_for_train_epochs")
        if reference:
            fixed = train["wall_s"] - reference
            print(f"| train fixed cost: stage {train['wall_s']:.1f} s - engine {reference:.1f} s | {fixed:.1f} s "
                  f"| <= {0.15 * reference + 20:.1f} s ({'met' if fixed <= 0.15 * reference + 20 else 'missed'}) |")
        print(f"| peak memory, train worker (allocated) / device (nvidia-smi) | {train.get('peak_memory_gib')} GiB / "
              f"{train.get('device_peak_mib')} MiB | |")
        print("| where the stage's seconds went | " + ", ".join(f"{k.removesuffix('_s')} {v}"
                                                              for k, v in train.get("timings", {}).items()) + " | |")
    dp = data.get("dp_graph", {})
    print("\n| run that should use the graph | cuda_graph | graph_fallback_reason |\n| --- | --- | --- |")
    print(f"| train stage (Ray worker) | {train.get('cuda_graph')} | {train.get('graph_fallback_reason')} |")
    print(f"| engine alone | {engine.get('cuda_graph')} | {engine.get('graph_fallback_reason')} |")
    for run in dp.get("runs", []):
        if run["run"].startswith("graph"):
            print(f"| data-parallel graph (1 rank) | {run['graph_ran']} | {run['graph_fallback_reason']} |")
    if "runs" in dp:
        print(f"data-parallel graph vs eager, {dp['iterations']} iterations: |diff| at the first replay "
              f"{dp['abs_diff_iteration_4']}, max over 4-20 {dp['max_abs_diff_iterations_4_to_20']}, last-50 means "
              f"{dp['mean_loss_d_g_last_50']}; eager with the all-reduce == eager: {dp['eager_all_reduce_equals_eager']}")
    rows = data.get("sweep", [])
    if rows:
        base = next((r["trials_per_hour"] for r in rows if r["trials_per_gpu"] == 1), None)
        print("\n| trials_per_gpu | wall s | trials finished | trials/hour | vs 1 per GPU | peak GiB per trial "
              "| graph fallbacks |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in sorted(rows, key=lambda r: r["trials_per_gpu"]):
            print(f"| {row['trials_per_gpu']} | {row['wall_s']} | {row['trials_finished']}/{row['trials']} "
                  f"| {row['trials_per_hour']} | {_ratio(row['trials_per_hour'], base)} "
                  f"| {row['peak_memory_per_trial_gib']} "
                  f"| {sorted({t['graph_fallback_reason'] for t in row['per_trial'] if t['graph_fallback_reason']})} |")
        best = max(rows, key=lambda r: r["trials_per_hour"])
        print(f"best: trials_per_gpu {best['trials_per_gpu']}, {_ratio(best['trials_per_hour'], base)}x one trial "
              "per GPU (target >= 3)")
    compared = data.get("compare_train", {})
    if "epochs" in compared and "epochs" in train:
        other, default = compared["epochs"][-1], train["epochs"][-1]
        print(f"\nat the train stage's budget ({default['epoch']} epochs): FID {default['fid']:.3f} with the default "
              f"(cond_accuracy {default.get('cond_accuracy')}), {other['fid']:.3f} with "
              f"model.conditional={compared['conditional']} ({other['fid'] / default['fid'] - 1:+.0%}; cond_accuracy "
              f"{other.get('cond_accuracy')}); graph_fallback_reason {compared['graph_fallback_reason']}")
    if "export" in data:
        print(f"\nexport: {data['export']}")
    failed = [name for name, value in data.items() if isinstance(value, dict) and "error" in value]
    if failed:
        print(f"\nsections that failed (their error is in the JSON): {', '.join(failed)}")
