"""The README's promises: CI runs its test command, and its quick-tour snippet runs."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


class TestReadme:
    def test_ci_runs_the_readme_test_command(self):
        test_command = next(b for b in _bash_blocks() if "pytest" in b)
        ci = (ROOT / ".ci" / "run").read_text().splitlines()
        assert test_command.strip() in [line.strip() for line in ci]

    def test_demo_command_is_the_repforget_demo(self):
        demo = next(b for b in _bash_blocks() if "repforget demo" in b)
        assert demo.strip().endswith("repforget demo --out runs/demo")

    def test_quick_tour_runs_and_its_claims_hold(self):
        import torch

        from repforget_kernels import linear_cka

        snippet = re.search(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
        env = {"print": lambda *a, **k: None}
        exec(compile(snippet, "README.md", "exec"), env)
        # "equals linear_cka(x, y, debiased=True)" and the shapes the comments state
        torch.testing.assert_close(env["s"].compute(), linear_cka(env["x"], env["y"], debiased=True), rtol=0, atol=1e-5)
        assert env["pca"].components.shape == (6, 4, 64)

    def test_quick_tour_model_snippet_runs_and_its_claims_hold(self):
        snippet = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)[1]
        env = {"print": lambda *a, **k: None}
        exec(compile(snippet, "README.md", "exec"), env)
        assert env["result"].cka.shape == env["result"].cka_tokens.shape == env["result"].pca_similarity.shape == (4,)
        assert len(env["report"]["layers"]) == 4
        assert env["scalars"]["repr/cka/layer_0"] == float(env["result"].cka[0])
        assert env["monitor"].step(env["tuned"], 99) is None

    def test_memory_table_is_what_memory_plan_says(self):
        from transformers import LlamaConfig, Qwen2Config

        from repforget_kernels.driver.models import memory_plan
        from test_driver_models import QWEN25_7B, YI_6B

        configs = {"Qwen2.5-7B": Qwen2Config(**QWEN25_7B), "Yi-6B": LlamaConfig(**YI_6B)}
        rows = re.findall(r"^\| (Qwen2\.5-7B|Yi-6B) \| (\d+) \| (\w+) \| (on|off) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (.+) \|$",
                          (ROOT / "README.md").read_text(), re.M)
        assert len(rows) == 7
        for name, gpus, optimizer, tc, kl, others, diag, fits in rows:
            p = memory_plan(configs[name], optimizer=optimizer, batch_size=8, seq_len=512, gpus=int(gpus),
                            token_cka=tc == "on", diag_batch_size=2)
            assert (kl, others, diag) == (f"{p['training'] / 1e9:.1f}", f"{(p['training'] - p['bytes']['kl_reference']) / 1e9:.1f}",
                                          f"{p['diagnostics'] / 1e9:.1f}")
            want = "every method" if p["fits_80gb"] else "GA, GA+GD, NPO, RLabel" if p["total_without_kl"] <= p["budget"] else "none"
            assert fits == want
