"""retrieval_attention.plotting.plot_stats on the stats of a real (tiny) model run, with the Agg backend."""
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import retrieval_attention as ra
from retrieval_attention.plotting import plot_stats

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def cache():
    """A tiny random Llama (3 layers) after a 160-token prefill and 40 decode steps: every layer has CPU tokens,
    a built query-guided index, a non-zero scanned fraction and a build time."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("retrieval_attention")
    rcfg = ra.RetrievalConfig(n_sink=4, n_window=16, top_k=8, ef=16, evict_chunk=8,
                              index_params={"degree": 8, "k_train": 16}, mass_probe_every=5)
    cache = ra.RetrievalCache(model.config, rcfg)
    ids = torch.randint(0, 64, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    return cache


def test_plot_from_cache_and_from_stats(cache, tmp_path):
    import matplotlib.pyplot as plt

    stats = cache.stats()
    assert len(stats) == 3 and all(s["cpu_tokens"] > 0 and s["scanned_frac"] > 0 for s in stats)
    path = tmp_path / "stats.png"
    fig = plot_stats(cache, path)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.axes[:4]
    assert [ax.get_ylabel() for ax in axes] == ["CPU keys scanned (%)", "MiB", "index build (s)", "attention mass (%)"]
    # the bars carry the stats' numbers
    scanned = [p.get_height() for p in axes[0].patches]
    assert scanned == pytest.approx([100 * s["scanned_frac"] for s in stats])
    mem = [p.get_height() for p in axes[1].patches]  # device bars, then CPU KV, then CPU index
    assert mem[:3] == pytest.approx([s["device_kv_bytes"] / 2**20 for s in stats])
    assert mem[3:6] == pytest.approx([s["cpu_kv_bytes"] / 2**20 for s in stats])
    assert mem[6:9] == pytest.approx([s["cpu_index_bytes"] / 2**20 for s in stats])
    assert [p.get_height() for p in axes[2].patches] == pytest.approx([s["index_build_s"] for s in stats])
    assert [t.get_text() for t in axes[3].get_xticklabels()] == ["0", "1", "2"]
    # attention mass: the CPU share bars, then the probe's recovered-mass bars, and its minimum as markers
    assert all(s["mass_probes"] == 8 and 0 < s["recovered_mass_min"] <= s["recovered_mass_mean"] <= 1 + 1e-6 for s in stats)
    mass = [p.get_height() for p in axes[3].patches]
    assert mass[:3] == pytest.approx([100 * s["cpu_mass_share"] for s in stats])
    assert mass[3:6] == pytest.approx([100 * s["recovered_mass_mean"] for s in stats])
    assert list(axes[3].lines[0].get_ydata()) == pytest.approx([100 * s["recovered_mass_min"] for s in stats])
    plt.close(fig)

    # the list from cache.stats() gives the same plot; no path: nothing is written
    fig2 = plot_stats(stats, title="custom")
    assert fig2.axes[0].get_title() == "custom"
    assert [p.get_height() for p in fig2.axes[0].patches] == pytest.approx(scanned)
    plt.close(fig2)


def test_plot_without_probe_and_old_stats():
    """Probe off: only the CPU-share bars and a note; stats dicts from before the mass fields: an empty mass panel."""
    import matplotlib.pyplot as plt

    base = dict(layer=0, scanned_frac=0.1, index_build_s=0.5, device_kv_bytes=1, cpu_kv_bytes=2, cpu_index_bytes=3)
    fig = plot_stats([dict(base, cpu_mass_share=0.25, recovered_mass_mean=None, recovered_mass_min=None)])
    ax = fig.axes[3]
    assert [p.get_height() for p in ax.patches] == pytest.approx([25.0]) and not ax.lines
    assert any("probe off" in t.get_text() for t in ax.texts)
    plt.close(fig)
    fig = plot_stats([base])
    assert not fig.axes[3].patches
    plt.close(fig)


def test_plot_before_any_decode_step():
    """A fresh cache (nothing seen) still plots: zeros everywhere."""
    import matplotlib.pyplot as plt

    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    fig = plot_stats(ra.RetrievalCache(cfg, ra.RetrievalConfig()))
    assert [p.get_height() for p in fig.axes[0].patches] == [0.0, 0.0]
    plt.close(fig)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ([], ValueError, "empty"),
        (42, TypeError, "RetrievalCache or the list"),
        ([{"layer": 0}], ValueError, "lacks"),
        (["x"], TypeError, "must be a dict"),
    ],
)
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        plot_stats(bad)


def test_clear_error_without_matplotlib():
    """In a process where matplotlib cannot be imported, plot_stats raises an ImportError naming it; importing the
    module itself does not need matplotlib."""
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
        "from retrieval_attention.plotting import plot_stats\n"
        "stats = [dict(layer=0, scanned_frac=0.1, index_build_s=0.0, device_kv_bytes=1, cpu_kv_bytes=2, cpu_index_bytes=3)]\n"
        "try:\n    plot_stats(stats)\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTERROR" in out.stdout and "pip install matplotlib" in out.stdout
