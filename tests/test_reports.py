"""Reports from records: adaptive table, paper comparison, timing, figures, index."""

import json

import pandas as pd

from benchmark.cli import main as cli_main
from benchmark.paper import reference_numbers
from benchmark.reports import (
    _frame,
    ablation_markdown,
    ablation_table,
    adaptive_table,
    paper_comparison,
    timing_table,
    write_report,
)


def rec(defense, attack, bits, registered=None, dataset="cifar10-jpeg", seconds=1.0, label=None, reg_def=None):
    k = bits.count("1")
    return {"cell": {"dataset": dataset, "target": "t", "defense": defense, "attack": attack},
            "attack_label": label or attack, "attack_registered": registered or attack,
            "defense_registered": reg_def or defense, "n": len(bits), "n_correct": k, "accuracy": k / len(bits),
            "ci95": [0.0, 1.0], "correct": bits, "dataset_copy": "copy X", "profile": "smoke",
            "threat": {"eps": 8 / 255, "norm": "linf"}, "target": {"arch": "resnet18", "method": "at"},
            "seconds": seconds, "images_per_second": len(bits) / seconds, "forwards": 10, "backwards": 5,
            "peak_gpu_memory_mb": None, "defense_training": {"seconds": 12.0, "seconds_per_epoch": 3.0}}


RECORDS = [
    rec("none", "clean", "1111"), rec("none", "pgd", "1100"),
    rec("DIR", "clean", "1111", reg_def="dir"), rec("DIR", "pgd", "1110", reg_def="dir"),
    rec("DIR", "eot-pgd", "1100", reg_def="dir"), rec("DIR", "mask-adaptive", "1000", reg_def="dir"),
]


def test_adaptive_table_takes_the_strongest_declared_attack():
    t = adaptive_table(_frame(RECORDS)).set_index("defense")
    assert t.loc["DIR", "plain"] == 0.75 and t.loc["DIR", "adaptive"] == 0.25
    assert t.loc["DIR", "adaptive_attack"] == "mask-adaptive" and abs(t.loc["DIR", "drop"] - 0.5) < 1e-12
    assert t.loc["none", "plain"] == 0.5 and pd.isna(t.loc["none", "adaptive"])


def test_ablation_block_pairs_the_released_dir_with_its_control():
    assert ablation_table(_frame(RECORDS))[0].empty  # no joint-at / dir-official rows: no block
    records = RECORDS + [
        rec("joint-AT", "clean", "1111", reg_def="joint-at"), rec("joint-AT", "pgd", "1110", reg_def="joint-at"),
        rec("DIR-official", "clean", "1110", reg_def="dir-official"),
        rec("DIR-official", "pgd", "1010", reg_def="dir-official"),
    ]
    rows, diffs = ablation_table(_frame(records))
    r = rows.set_index("defense")
    assert r.loc["joint-AT", "worst"] == 0.75 and r.loc["DIR-official", "worst"] == 0.5
    assert r.loc["none", "worst"] == 0.5 and r.loc["DIR", "worst"] == 0.25 and r.loc["DIR", "registered"] == "dir"
    d = diffs.set_index("comparison")
    assert list(d.index) == ["joint-AT - none", "DIR-official - joint-AT", "DIR-official - none", "DIR - none"]
    assert d.loc["joint-AT - none", "worst"]["difference"] == 0.25
    assert d.loc["DIR-official - joint-AT", "worst"]["difference"] == -0.25
    assert d.loc["DIR-official - joint-AT", "clean"]["difference"] == -0.25
    # paired, over the attacks both rows faced (PGD: none never faced DIR's EOT-PGD and mask-adaptive):
    # sample 2 survives PGD only with DIR
    assert d.loc["DIR - none", "worst"]["only_a"] == 1 and d.loc["DIR - none", "worst"]["only_b"] == 0
    assert d.loc["DIR - none", "worst"]["attacks"] == 1
    text = ablation_markdown(rows, diffs)
    assert "| DIR-official - joint-AT | the released denoiser | -25.00 [" in text


def test_paper_comparison_differences():
    ref = reference_numbers()
    assert ref["table1"]["cifar10"]["dir"]["pgd"] == 54.27 and ref["table3"]["ebm"]["bpda-eot"] == 51.43
    t = paper_comparison(_frame(RECORDS)).set_index(["defense", "column"])
    assert abs(t.loc[("none", "pgd"), "difference"] - (50.0 - 45.72)) < 1e-9
    assert abs(t.loc[("DIR", "clean"), "paper"] - 85.11) < 1e-9
    assert ("DIR", "eot-pgd") not in t.index  # the paper has no such column
    other = paper_comparison(_frame([rec("none", "pgd", "10", dataset="digits")]))
    assert other.empty


class _Page:
    """What an HTML page holds, read with the standard library's parser (not by string matching)."""

    def __init__(self, text: str) -> None:
        from html.parser import HTMLParser

        self.tags, self.tables, self.links, self.images, self.figures = [], [], [], [], 0
        self.in_thead = False
        page = self

        class Reader(HTMLParser):
            def handle_endtag(self, tag):
                if tag == "thead":
                    page.in_thead = False

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                page.tags.append(tag)
                if tag == "thead":
                    page.in_thead = True
                if tag == "table":
                    page.tables.append({"thead_th": 0, "rows": 0})
                elif tag == "th" and page.tables and page.in_thead:
                    page.tables[-1]["thead_th"] += 1
                elif tag == "tr" and page.tables:
                    page.tables[-1]["rows"] += 1
                elif tag == "a":
                    page.links.append(a.get("href", ""))
                elif tag == "img":
                    page.images.append(a.get("src", ""))
                elif tag == "figure":
                    page.figures += 1

        Reader().feed(text)


def test_timing_table_and_report_files(tmp_path):
    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    for r in RECORDS:  # write through the real record format (checksums, plan)
        from benchmark.records import write_record

        cid = f"{r['cell']['defense']}__{r['cell']['attack']}"
        r = dict(r, cell_id=cid, cell_hash="h-" + cid)
        write_record(run / "records" / f"{cid}.json", r)
    (run / "plan.json").write_text(json.dumps({"cells": [
        {"cell_id": f"{r['cell']['defense']}__{r['cell']['attack']}", "cell_hash": "h-" + r['cell']['defense']
         + "__" + r['cell']['attack'], **r["cell"]} for r in RECORDS]}))
    (run / "manifest.json").write_text(json.dumps({"profile": "smoke", "device": "cpu", "config_hash": "abc",
                                                   "versions": {"torch": "x", "git_commit": "deadbeef"},
                                                   "config": {"name": "synthetic"}}))
    t = timing_table(_frame(RECORDS))
    assert list(t["seconds"]) == [1.0] * len(RECORDS)
    paths = write_report(run)
    names = {p.name for p in paths}
    assert {"index.md", "adaptive.md", "paper_comparison.md", "timing.md", "timing.csv",
            "timing.png", "timing.pdf", "cost_robustness.png", "results.md"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    png = run / "report" / "figures" / "timing.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = (run / "report" / "figures" / "timing.pdf").read_bytes()
    assert b"/Type3" not in pdf and (b"/TrueType" in pdf or b"/CIDFontType2" in pdf)  # TrueType outlines
    index = (run / "report" / "index.md").read_text()
    assert "deadbeef" in index and "figures/timing.png" in index and "| DIR |" in index
    assert "+4.28" in (run / "report" / "paper_comparison.md").read_text()  # 50.00 - 45.72
    assert cli_main(["report", str(run)]) == 0
    assert "ablation.md" not in names  # the block needs joint-at and dir-official rows
    # every HTML page of the report, parsed: each table has a header row, each image exists
    pages = sorted((run / "report").rglob("*.html"))
    assert run / "report" / "index.html" in pages and len(pages) >= 5
    for html_path in pages:
        page = _Page(html_path.read_text())
        assert page.tables and all(t["thead_th"] > 0 for t in page.tables), html_path
        for src in page.images:
            assert (html_path.parent / src).is_file(), (html_path, src)
    assert _Page((run / "report" / "index.html").read_text()).figures >= 2


def test_paper_figures_from_synthetic_records(tmp_path):
    from benchmark.reports import alpha_figure, noise_discard_figure, worst_bars_figure

    discard = []
    for target in ("nat", "at"):
        for base in ("pgd", "mi-fgsm"):
            for f in (0.0, 0.5, 0.9):
                r = rec("none", f"{base}-discard{int(100 * f)}", "1100" if f < 0.5 else "1110", "noise-discard")
                r["cell"]["target"] = target
                r["attack_params"] = {"base": base, "fraction": f}
                discard.append(r)
    paths = noise_discard_figure(discard, tmp_path / "fig2")
    assert [p.suffix for p in paths] == [".png", ".pdf", ".txt", ".tex"] and all(p.stat().st_size > 1000
                                                                               for p in paths[:2])
    caption = paths[2].read_text()  # the caption beside the figure, not inside it (a paper sets its own)
    assert "Figure 2" in caption and f"\\caption{{{caption.strip()}}}" in paths[3].read_text()
    alphas = []
    for a in (0.0, 1.0, 2.0):
        for attack, bits in (("clean", "1111"), ("pgd", "1000" if a else "1100")):
            r = rec(f"dir-alpha{int(a)}", attack, bits, reg_def="dir")
            r["defense_train"] = {"alpha": a}
            alphas.append(r)
    assert len(alpha_figure(alphas, tmp_path / "fig6a")) == 4
    assert alpha_figure(alphas[:2], tmp_path / "one") == []  # a single alpha: no curve to draw
    assert len(worst_bars_figure(_frame(RECORDS), tmp_path / "bars")) == 4
    assert noise_discard_figure(RECORDS, tmp_path / "none") == []


def test_umap_figure_and_class_separation(tmp_path):
    import numpy as np

    from benchmark.umap_report import class_separation, umap_figure

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 80)
    separated = rng.normal(size=(240, 16)) * 0.3 + np.eye(3, 16)[labels] * 5
    mixed = rng.normal(size=(240, 16))
    assert class_separation(separated, labels) > 0.5 > class_separation(mixed, labels)
    paths, scores = umap_figure({"good": (separated, labels), "bad": (mixed, labels)}, tmp_path / "umap")
    assert [p.suffix for p in paths] == [".png", ".pdf", ".txt", ".tex"] and paths[0].stat().st_size > 5000
    assert scores["good"]["silhouette_features"] > scores["bad"]["silhouette_features"]
    assert scores["good"]["n"] == 240


def test_exact_neighbours_handed_to_umap_are_the_brute_force_ones():
    """The exact kNN the report gives umap (below its brute-force size) is what brute force finds:
    the same neighbours in the same order as scikit-learn's, itself first at distance 0."""
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    from benchmark.umap_report import exact_knn

    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 12)).astype(np.float32)
    idx, dist = exact_knn(x, 15)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=15).fit(x).kneighbors(x)
    assert idx.dtype == np.int32 and dist.dtype == np.float32 and idx.shape == dist.shape == (150, 15)
    assert (idx[:, 0] == np.arange(150)).all() and np.allclose(dist[:, 0], 0, atol=1e-3)
    assert (idx == ref_idx).all() and np.allclose(dist, ref_dist, atol=1e-4)


def test_the_neighbourhood_weights_are_umap_learns_without_its_compilation():
    import numpy as np
    import pytest
    import umap.umap_ as umap_module

    from benchmark.umap_report import embed, exact_knn, membership_strengths, smooth_knn_dist

    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    x[7] = x[8]  # a duplicate: a zero distance among the neighbours
    idx, dist = exact_knn(x, 15)
    idx[3, -1], dist[3, -1] = -1, 0.0  # a missing neighbour
    for connectivity in (1.0, 1.5, 0.5):
        ours = smooth_knn_dist(dist, 15.0, local_connectivity=connectivity)
        theirs = umap_module.smooth_knn_dist(dist, 15.0, local_connectivity=connectivity)
        assert np.allclose(ours[0], theirs[0], rtol=1e-4) and np.allclose(ours[1], theirs[1], rtol=1e-6)
        for a, b in zip(membership_strengths(idx, dist, *ours, return_dists=True),
                        umap_module.compute_membership_strengths(idx, dist, *theirs, return_dists=True)):
            assert a.dtype == b.dtype and np.allclose(a, b, atol=1e-5)
    # umap-learn's own functions are back in place after an embedding, and after one that failed
    before = umap_module.smooth_knn_dist
    assert embed(x[:60]).shape == (60, 2) and umap_module.smooth_knn_dist is before
    with pytest.raises(ValueError):
        embed(np.full((30, 4), np.nan, dtype=np.float32))
    assert umap_module.smooth_knn_dist is before


def test_paper_comparison_finds_tables_2_to_5_and_the_text():
    rows = []
    r = rec("DIR", "bpda-eot", "1010", reg_def="dir")
    rows.append(r)
    r = rec("HGD", "pgd", "1000", reg_def="hgd")
    r["target"] = {"arch": "resnet18", "method": "natural"}
    rows.append(r)
    r = rec("NRP", "autoattack", "1000", label="AA", reg_def="nrp")
    r["target"] = {"arch": "resnet18", "method": "mart"}
    rows.append(r)
    r = rec("dir-4-1", "clean", "1111", reg_def="dir")
    r["defense_options"] = {"depth": 4, "decoder_depth": 1}
    rows.append(r)
    rows.append(rec("DIR", "mask-adaptive", "1100", reg_def="dir"))
    t = paper_comparison(_frame(rows)).set_index("defense")
    assert t.loc["DIR"].set_index("source").loc["Table 3", "paper"] == 52.09
    assert t.loc["HGD", "paper"] == 20.57 and t.loc["HGD", "source"] == "Table 4"
    assert t.loc["NRP", "paper"] == 16.91 and t.loc["NRP", "source"] == "Table 2"
    assert t.loc["dir-4-1", "paper"] == 84.20 and t.loc["dir-4-1", "source"] == "Table 5"
    assert t.loc["DIR"].set_index("source").loc["§4.2-4.3", "paper"] == 53.68


def test_markdown_to_html_renders_tables_images_and_links():
    from benchmark.reports import markdown_to_html

    md = ("# T <x>\n\n## Results\n\n| A | B |\n|---|---:|\n| **1** | `c` |\n| y | **75.00 [63.2, 84.0]** |\n\n"
          "Data: a note.\n\n![fig](figures/a.png) ([PDF](figures/a.pdf))\n\n[t](../tables/results.md) "
          "[w](https://example.org/a.md)\n\n- item\n- two\n\n## Cost\n")
    text = markdown_to_html(md, "t")
    page = _Page(text)
    assert "<h1 id=\"t-x\">T &lt;x&gt;</h1>" in text  # escaped, with an anchor
    assert [t["thead_th"] for t in page.tables] == [2] and page.tables[0]["rows"] == 3  # a header row
    assert '<th style="text-align:right">B</th>' in text  # the separator's alignment
    assert '<strong>75.00</strong><span class="ci">[63.2, 84.0]</span></td>' in text  # the interval under it
    assert page.figures == 1 and page.images == ["figures/a.png"] and "<figcaption>fig (<a href" in text
    assert "../tables/results.html" in page.links  # the rendered page, not the raw Markdown
    assert "https://example.org/a.md" in page.links  # another site's link is left alone
    assert page.tags.count("ul") == 1 and page.tags.count("li") == 2 and "---" not in text
    assert page.links[:2] == ["#results", "#cost"]  # the navigation bar: the page's sections


def test_adaptive_table_shows_the_zero_gradient_flag():
    masked = dict(rec("ME-Net", "pgd", "1111", reg_def="menet"), gradient_check={"n": 4, "zero_gradient_fraction": 1.0, "finite": True, "masked": True})
    records = [rec("none", "pgd", "1100"), masked, rec("ME-Net", "bpda-eot", "1000", reg_def="menet")]
    t = adaptive_table(_frame(records)).set_index("defense")
    assert t.loc["ME-Net", "masking_flags"] == "pgd" and pd.isna(t.loc["none", "masking_flags"])
    from benchmark.reports import adaptive_markdown

    md = adaptive_markdown(t.reset_index())
    # Worst 25% (pgd AND bpda-eot); against none over the attacks both faced (pgd alone: none never faced
    # bpda-eot): 100% against 50% on the same samples, +50 points, p = 0.5 (two discordant samples)
    assert "| 100.00 | 25.00 [0.0, 100.0] | bpda-eot | 75.00 | - | - | 25.00 | +50.00 [" in md and "nan" not in md
    assert "p = 0.500, k = 1 | pgd |" in md


def test_adaptive_table_shows_bpda_and_exact_gradients_side_by_side():
    declared = {"defense_declarations": {"stochastic": True, "exact_gradient": True}}

    def cell(attack, bits, gradient, label):
        return dict(rec("EBM", attack, bits, registered="bpda-eot", reg_def="ebm", label=label), **declared,
                    attack_info={"resolved": {"bpda": gradient != "exact", "eot": 5, "gradient": gradient}})

    records = [rec("none", "pgd", "1100"), rec("EBM", "pgd", "1111", reg_def="ebm"),
               cell("bpda-eot", "1110", "bpda", "BPDA+EOT"), cell("bpda-eot-exact", "1010", "exact", "exact")]
    t = adaptive_table(_frame(records)).set_index("defense")
    assert t.loc["EBM", "bpda"] == 0.75 and t.loc["EBM", "exact"] == 0.5
    assert t.loc["EBM", "adaptive"] == 0.5 and t.loc["EBM", "worst"] == 0.5  # 1111 AND 1110 AND 1010
    assert pd.isna(t.loc["none", "bpda"]) and pd.isna(t.loc["none", "exact"])
