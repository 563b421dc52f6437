"""cryknn.report: the HTML page's data and flags (plain Python), the `--html` flag, and the
page in a real browser: headless Chromium opens it offline, the page reports no error and
the screenshot shows the structure drawn with its flagged sites in their colours."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest

from cryknn import elements as elements_lib
from cryknn import errors
from cryknn import report
from cryknn import site_scores
from cryknn import cif as structures_lib
from tests.conftest import METHANE_CIF, NACL_CIF, error_lines, run_module

TOP = [("C", 0.9), ("N", 0.06), ("O", 0.04)]


def _nacl():
    """Rock salt (2 sites, 8 atoms) scored so that Na is outside the domain (not modelled)
    and Cl implausible."""
    (s,), _ = structures_lib.read_cif_text(NACL_CIF, "nacl")
    sites = [site_scores.SiteScore(s.id, "Na1", "Na", "Cl", 0.7, None, 4, 1, top=TOP,
                                   flag="outside_domain"),
             site_scores.SiteScore(s.id, "Cl1", "Cl", "O", 0.8, 0.01, 4, 2, top=TOP,
                                   flag="implausible")]
    return s, site_scores.StructureScore(s.id, sites, 0.01, 4, 8, [])


def _random(n: int, id: str = "random:big", seed: int = 0):
    """n atoms of C, H, N, O at random in a MOF-sized cell, one site per atom, a tenth of
    them implausible."""
    rng = np.random.default_rng(seed)
    lattice = np.diag([1.0, 1.1, 1.2]) * 2.4 * n ** (1 / 3)  # about 10 A^3 per atom
    numbers = rng.choice([1, 6, 7, 8], n)
    s = structures_lib.Structure.from_arrays(lattice, rng.random((n, 3)), numbers, id=id)
    p = np.where(rng.random(n) < 0.1, 0.01, 0.5 + 0.5 * rng.random(n))
    sites = [site_scores.SiteScore(id, str(s.labels[i]), elements_lib.symbol(int(z)),
                                   "C", 0.9, float(p[i]), 1, i + 1, top=TOP,
                                   flag="implausible" if p[i] < 0.05 else "")
             for i, z in enumerate(numbers)]
    return s, site_scores.StructureScore(id, sites, 0.5, n, n, ["a warning"])


def _page_data(text: str) -> dict:
    found = re.search(r'<script type="application/json" id="cryknn-data">(.*?)</script>',
                      text, re.S)
    assert found, "no data block"
    return json.loads(found.group(1))


def test_page_holds_the_structures_and_their_flags(tmp_path):
    nacl, nacl_score = _nacl()
    big, big_score = _random(50)
    path = tmp_path / "report.html"
    n = report.write_html(path, [nacl, big], site_scores.Scores([nacl_score, big_score]),
                          threshold=0.05, model="toy model")
    assert n == 2
    data = _page_data(path.read_text(encoding="utf-8"))
    assert data["model"] == "toy model" and data["threshold"] == 0.05
    assert data["rule"] == "p(given) < 0.05"  # what the page says made a site implausible
    first, second = data["structures"]
    assert first["id"] == "nacl:nacl" and first["atoms"] == 8
    assert [row[6] for row in first["sites"]] == ["outside_domain", "implausible"]
    assert first["counts"] == {"implausible": 1, "outside_domain": 1}
    # Every atom points at its site's row; the symbols and coordinates are the structure's.
    assert first["site"] == [int(i) for i in nacl.site_index]
    symbols = [first["elements"][z] for z in first["z"]]
    assert symbols.count("Na") == 4 and symbols.count("Cl") == 4
    assert np.allclose(np.reshape(first["xyz"], (8, 3)), nacl.cart, atol=1e-3)
    assert np.allclose(np.reshape(first["cell"], (3, 3)), nacl.lattice, atol=1e-4)
    flagged = [row[0] for row in second["sites"] if row[6] == "implausible"]
    assert flagged == [t.site_label for t in big_score.sites if t.p_given < 0.05]
    assert second["warnings"] == ["a warning"] and len(second["xyz"]) == 150


def test_a_sites_own_flag_wins_over_the_threshold():
    site = types.SimpleNamespace(p_given=0.01, flag="")  # the scorer said: not flagged
    assert report.site_flag(site, 0.05) == ""
    site = types.SimpleNamespace(p_given=0.9, flag="outside_domain")
    assert report.site_flag(site, 0.05) == "outside_domain"
    assert report.site_flag(types.SimpleNamespace(p_given=0.01), 0.05) == "implausible"
    assert report.site_flag(types.SimpleNamespace(p_given=0.01), 0.005) == ""
    assert report.site_flag(types.SimpleNamespace(p_given=None), 0.05) == "outside_domain"
    with pytest.raises(ValueError):
        report.site_flag(types.SimpleNamespace(p_given=0.5, flag="odd"), 0.05)


def test_per_atom_scores_and_skipped_structures(tmp_path):
    nacl, _ = _nacl()
    big, big_score = _random(5)
    per_atom = [site_scores.SiteScore(nacl.id, f"X{i}", "Na", "C", 0.5, 0.5 if i else 0.001, 1,
                                      int(nacl.site_index[i]) + 1, atom_index=i,
                                      flag="" if i else "implausible") for i in range(8)]
    nacl_score = site_scores.StructureScore(nacl.id, per_atom, 0.5, 8, 8, [])
    # `big` was not scored (skipped): it is left out; nacl's rows are its atoms.
    data = _page_data(report.render([report.structure_record(s, score) for s, score in
                                     report.paired([big, nacl], [nacl_score])]))
    (record,) = data["structures"]
    assert record["site"] == list(range(8)) and record["counts"]["implausible"] == 1
    # Scores of another structure under its id: refused, not drawn wrong.
    wrong = site_scores.StructureScore(nacl.id, big_score.sites[:1], None, 0, 8, [])
    with pytest.raises(errors.DataError, match="do not fit"):
        report.write_html(tmp_path / "r.html", [nacl], [wrong])


def test_page_is_self_contained_and_safe(tmp_path):
    nacl, score = _nacl()
    evil = "</script><script>alert(1)</script>&"
    nacl = dataclasses.replace(nacl, id=evil)
    score.structure_id = evil
    for site in score.sites:
        site.site_label = evil
    path = tmp_path / "report.html"
    site_scores.Scores([score]).to_html(str(path), [nacl], title="<b>x</b>")
    text = path.read_text(encoding="utf-8")
    # Nothing fetched: no script, style or image from elsewhere.
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)\s*=", text, re.I)
    assert "@import" not in text
    # The id cannot end a script element; it comes back intact from the data.
    assert text.count("</script>") == text.count("<script")
    assert _page_data(text)["structures"][0]["id"] == evil
    assert "<title>&lt;b&gt;x&lt;/b&gt;</title>" in text
    # The viewer's licence travels with it.
    assert "3Dmol.js" in text and "Redistribution and use in source and binary forms" in text


def test_page_size_of_a_1000_atom_mof(tmp_path):
    s, score = _random(1000)
    path = tmp_path / "report.html"
    report.write_html(path, s, [score])
    size = path.stat().st_size
    viewer = os.path.getsize(os.path.join(report.ASSETS, report.VIEWER_JS))
    data = len(re.search(r'id="cryknn-data">(.*?)</script>', path.read_text(), re.S).group(1))
    # Coordinates, element and site per atom plus one row per site: ~80 bytes an atom.
    assert data < 120_000, data
    assert size < viewer + data + 40_000, (size, viewer, data)


def test_write_html_refuses_a_folder_and_a_bad_threshold(tmp_path):
    nacl, score = _nacl()
    with pytest.raises(OSError):
        report.write_html(tmp_path, [nacl], [score])
    with pytest.raises(ValueError):
        report.write_html(tmp_path / "r.html", [nacl], [score], threshold=1.5)


def test_cli_writes_the_report(toy_workdir, tmp_path):
    cif = tmp_path / "methane.cif"
    cif.write_text(METHANE_CIF)
    out = tmp_path / "report.html"
    r = run_module("cryknn.predict", f"--workdir={toy_workdir}", f"--html={out}",
                   "--adjacent_threshold=0.5", str(cif))
    assert r.returncode == 0, r.stderr
    assert f"wrote the report of 1 structures to {out}" in r.stdout
    data = _page_data(out.read_text(encoding="utf-8"))
    assert data["rule"] == "p(given) < 0.05 or p(given) / (p(given) + p(Z+-1 neighbour)) < 0.5"
    (record,) = data["structures"]
    assert record["id"] == "methane:methane" and record["atoms"] == 7
    zn = [row for row in record["sites"] if row[0] == "Zn1"]
    assert zn and zn[0][6] == "outside_domain"  # Zn is not an element of the toy model
    r = run_module("cryknn.predict", f"--workdir={toy_workdir}", f"--html={tmp_path}", str(cif))
    assert r.returncode == 2 and error_lines(r) == [f"error: cannot write --html={tmp_path}"]


# ----------------------------------------------------------------------------
# In a real browser.

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WINDOW = (1280, 1000)


def _browser() -> str:
    """The browser to test with: $CRYKNN_BROWSER, else the first of BROWSERS on PATH. Skips
    when there is none, unless $CRYKNN_REQUIRE_BROWSER (set by .ci/run) says there must be."""
    found = os.environ.get("CRYKNN_BROWSER") or next(
        (path for path in map(shutil.which, BROWSERS) if path), None)
    if found:
        return found
    message = ("no Chromium or Chrome on PATH (Debian: apt-get install chromium); set "
               "CRYKNN_BROWSER to use another")
    if os.environ.get("CRYKNN_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


def _open(browser: str, url: str, profile, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`, offline (every host name fails to resolve), software
    WebGL, the page's console on stderr."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               "--enable-unsafe-swiftshader", f"--user-data-dir={profile}", "--no-first-run",
               "--disable-extensions", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=3000",
               "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _status(dom: str) -> tuple[dict, str]:
    found = re.search(r'<p id="status"([^>]*)>([^<]*)</p>', dom)
    assert found, dom[-2000:]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', found.group(1))), found.group(2)


def _console_errors(stderr: str) -> list[str]:
    """The page's uncaught errors and failed loads in Chromium's console log."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line and
            re.search(r"Uncaught|Failed to load|net::ERR_", line)]


def test_browser_draws_the_report_without_errors(tmp_path):
    browser = _browser()
    Image = pytest.importorskip("PIL.Image", reason="the screenshot check needs Pillow")
    nacl, nacl_score = _nacl()
    big, big_score = _random(200, id="random:second", seed=1)
    path = tmp_path / "report.html"
    report.write_html(path, [big, nacl], [big_score, nacl_score])
    url = path.as_uri() + "#2"  # the second structure: NaCl with both kinds of flag
    r = _open(browser, url, tmp_path / "profile", "--dump-dom")
    assert r.returncode == 0, r.stderr[-3000:]
    attributes, status = _status(r.stdout)
    assert status == "drawn 8 atoms of nacl:nacl", (status, _console_errors(r.stderr))
    assert attributes["data-state"] == "ok" and attributes["data-resources"] == "0"
    assert not _console_errors(r.stderr)
    x, y, width, height = map(int, attributes["data-viewer-box"].split())
    assert y + height <= WINDOW[1], "the viewer must be inside the screenshot"
    shot = tmp_path / "shot.png"
    r = _open(browser, url, tmp_path / "profile", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.exists(), r.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))[y + 2:y + height - 2, x + 2:x + width - 2]
    drawn = np.any(pixels < 235, axis=-1)
    assert drawn.mean() > 0.01, f"only {drawn.mean():.2%} of the view is drawn"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # shaded spheres, not a flat box
    r_, g, b = (pixels[..., i].astype(int) for i in range(3))
    magenta = (r_ > 120) & (g < 60) & (b > 50) & (b < r_)  # implausible Cl (#e6007e, shaded)
    teal = (r_ < 60) & (g > 100) & (b > 100)  # outside-domain Na (#00a6a6, shaded)
    assert magenta.sum() > 100 and teal.sum() > 100, (magenta.sum(), teal.sum())


def test_browser_check_sees_a_broken_page(tmp_path):
    """The check above can fail: a script error on the page shows in the status line and
    in the console log."""
    browser = _browser()
    nacl, score = _nacl()
    path = tmp_path / "broken.html"
    report.write_html(path, [nacl], [score])
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("<main>", "<main><script>noSuchFunction();</script>", 1),
                    encoding="utf-8")
    r = _open(browser, path.as_uri(), tmp_path / "profile", "--dump-dom")
    attributes, status = _status(r.stdout)
    assert attributes["data-state"] == "error" and "noSuchFunction" in status
    assert any("noSuchFunction" in line for line in _console_errors(r.stderr))


def test_browser_tables_sort_and_select(tmp_path):
    """Clicks, as a user would: another structure, the p(given) header, the worst site."""
    browser = _browser()
    nacl, nacl_score = _nacl()
    small, small_score = _random(30, id="random:small", seed=2)
    path = tmp_path / "report.html"
    report.write_html(path, [small, nacl], [small_score, nacl_score])
    clicks = ("<script>"
              "document.querySelector('#structures tbody tr').click();"
              "document.querySelectorAll('#sites th')[4].click();"
              "document.querySelector('#sites tbody tr').click();"
              "</script></body>")
    path.write_text(path.read_text(encoding="utf-8").replace("</body>", clicks),
                    encoding="utf-8")
    r = _open(browser, path.as_uri() + "#2", tmp_path / "profile", "--dump-dom")
    attributes, status = _status(r.stdout)
    assert status == "drawn 30 atoms of random:small", (status, _console_errors(r.stderr))
    assert not _console_errors(r.stderr)
    body = re.search(r'<table id="sites">.*?<tbody>(.*?)</tbody>', r.stdout, re.S).group(1)
    shown = [float(p) for p in re.findall(r'<tr[^>]*><td>[^<]*</td><td>[^<]*</td><td>[^<]*'
                                          r'</td><td class="num">[^<]*</td><td class="num">'
                                          r'([0-9.]+)</td>', body)]
    expected = sorted(t.p_given for t in small_score.sites)
    assert shown == sorted(shown) and np.allclose(shown, expected, atol=1e-3)
    assert 'class="sorted-asc"' in r.stdout
