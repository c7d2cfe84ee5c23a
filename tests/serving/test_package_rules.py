"""serving.package without a model: the manifest format and every refusal of ``verify_package`` with its
message, the tarball's reproducibility when file times differ (zero mtimes, owners and modes), member-name
checks, and the logit comparison used by the runtime agreement checks. The files are plain bytes: the
checks read names and checksums, not models."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import time

import numpy as np
import pytest

from serving import package as pkg
from serving.package import MANIFEST, REQUIRED_FILES, PackageError


def make_folder(root, extra=()):
    """A folder with every required file (and ``extra`` names, e.g. in sub-folders) plus its manifest."""
    folder = root / "pkg"
    for i, name in enumerate([*REQUIRED_FILES, *extra]):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content {i} of {name}".encode())
    digest = pkg.write_manifest(str(folder))
    return folder, digest


def test_the_manifest_is_sha256sum_lines_sorted_by_name(tmp_path):
    folder, digest = make_folder(tmp_path, extra=["sub/b.txt", "a.txt"])
    text = (folder / MANIFEST).read_text()
    names = sorted([*REQUIRED_FILES, "sub/b.txt", "a.txt"])
    assert text == "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    entries, read_digest = pkg.read_manifest(str(folder))
    assert list(entries) == names and read_digest == digest
    assert pkg.verify_package(str(folder), digest) == {"files": entries, "manifest_sha256": digest}


def test_binary_mode_lines_and_blank_lines_are_read(tmp_path):
    folder, _ = make_folder(tmp_path)
    lines = (folder / MANIFEST).read_text().splitlines()
    (folder / MANIFEST).write_text("\n" + lines[0].replace("  ", " *", 1) + "\n\n" + "\n".join(lines[1:]) + "\n")
    assert len(pkg.verify_package(str(folder))["files"]) == len(REQUIRED_FILES)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / MANIFEST).write_bytes(b"x" * (pkg.MAX_MANIFEST_BYTES + 1)),
     f"MANIFEST.sha256: larger than {1 << 20} bytes"),
    (lambda f: (f / MANIFEST).write_bytes(b"\xff\xfe"), "MANIFEST.sha256: not UTF-8 text"),
    (lambda f: (f / MANIFEST).write_text("a" * 64 + "  " + MANIFEST + "\n"), "line 1 lists the manifest itself"),
    (lambda f: (f / MANIFEST).write_text(("a" * 64 + "  model.ts\n") * 2), "'model.ts' is listed twice"),
    (lambda f: (f / MANIFEST).write_text("A" * 64 + "  model.ts\n"), "line 1 is not '<sha256>  <name>'"),
    (lambda f: (f / MANIFEST).write_text("a" * 63 + "  model.ts\n"), "line 1 is not '<sha256>  <name>'"),
])
def test_a_malformed_manifest_is_refused(tmp_path, damage, message):
    folder, _ = make_folder(tmp_path)
    damage(folder)
    with pytest.raises(PackageError, match=message.replace("(", r"\(").replace("*", r"\*")):
        pkg.verify_package(str(folder))


def test_exactly_the_largest_manifest_is_still_parsed(tmp_path):
    folder, _ = make_folder(tmp_path)
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text + "\n" * (pkg.MAX_MANIFEST_BYTES - len(text)))
    assert len(pkg.read_manifest(str(folder))[0]) == len(REQUIRED_FILES)


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_every_required_file_must_be_listed(tmp_path, missing):
    folder, _ = make_folder(tmp_path)
    (folder / missing).unlink()
    pkg.write_manifest(str(folder))
    with pytest.raises(PackageError, match=f"{missing}: required, but not listed in MANIFEST.sha256"):
        pkg.verify_package(str(folder))


def test_unlisted_files_are_counted(tmp_path):
    folder, _ = make_folder(tmp_path)
    for name in ("x1", "x2", "x3"):
        (folder / name).write_text(name)
    with pytest.raises(PackageError, match=r"^x1: present in the package but not listed in MANIFEST.sha256 "
                                           r"\(and 2 more\)$"):
        pkg.verify_package(str(folder))
    (folder / "x2").unlink()
    (folder / "x3").unlink()
    with pytest.raises(PackageError, match=r"^x1: present in the package but not listed in MANIFEST.sha256$"):
        pkg.verify_package(str(folder))


def test_a_changed_file_names_both_digests(tmp_path):
    folder, _ = make_folder(tmp_path)
    listed = pkg.read_manifest(str(folder))[0]["model.ts"]
    (folder / "model.ts").write_bytes(b"other")
    actual = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(PackageError, match=f"model.ts: checksum mismatch \\(manifest {listed[:16]}\\.\\.\\., "
                                           f"file {actual[:16]}\\.\\.\\.\\)"):
        pkg.verify_package(str(folder))


def test_a_registry_digest_that_differs_names_both(tmp_path):
    folder, digest = make_folder(tmp_path)
    with pytest.raises(PackageError, match=f"digest {digest[:16]}\\.\\.\\. differs from the registry's record "
                                           f"{'0' * 16}\\.\\.\\."):
        pkg.verify_package(str(folder), "0" * 64)
    assert pkg.verify_package(str(folder), None)["manifest_sha256"] == digest  # no record: no comparison


def test_a_file_that_is_not_a_folder_is_not_a_package(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PackageError, match="not a folder; pass the package folder or its .tar.gz"):
        pkg.verify_package(str(tmp_path / "file"))


def test_a_listed_folder_is_not_a_regular_file(tmp_path):
    folder, _ = make_folder(tmp_path, extra=["sub/x.txt"])
    (folder / "sub" / "x.txt").unlink()
    (folder / "sub" / "x.txt").mkdir()
    with pytest.raises(PackageError, match="sub/x.txt: is a link or not a regular file"):
        pkg.verify_package(str(folder))


def test_a_fifo_is_refused_when_listing(tmp_path):
    folder, _ = make_folder(tmp_path)
    os.mkfifo(folder / "pipe")
    with pytest.raises(PackageError, match="pipe: is not a regular file"):
        pkg.write_manifest(str(folder))


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "./a", "a/./b", "a/../b", "..", "a\\b", "C:x", "c:/x", "a\x00b",
                                  "a/"])
def test_member_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(PackageError, match="is not a plain relative path inside the package"):
        pkg.check_member_name(name)


@pytest.mark.parametrize("name", ["model.ts", "sub/dir/file.bin", "a..b", ".hidden", "C_x"])
def test_plain_names_pass(name):
    assert pkg.check_member_name(name) == name


def test_read_verified_returns_the_bytes_it_checked(tmp_path):
    folder, _ = make_folder(tmp_path)
    files = pkg.verify_package(str(folder))["files"]
    assert pkg.read_verified(str(folder), "model.ts", files) == (folder / "model.ts").read_bytes()
    (folder / "model.ts").write_bytes(b"swapped after the check")
    with pytest.raises(PackageError, match="model.ts: changed while being loaded"):
        pkg.read_verified(str(folder), "model.ts", files)


# -------------------------------------------------------------------------------------------- tarball
def test_the_tarball_does_not_depend_on_file_times_or_owners(tmp_path):
    folder, _ = make_folder(tmp_path, extra=["sub/x.txt"])
    first = pkg.make_tarball(str(folder), str(tmp_path / "a.tar.gz"))
    for path in folder.rglob("*"):
        os.utime(path, (time.time() - 86_400 * 400, time.time() - 86_400 * 400))  # a year older
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    second = pkg.make_tarball(str(folder), str(tmp_path / "b.tar.gz"))
    assert first == second
    assert first == hashlib.sha256((tmp_path / "a.tar.gz").read_bytes()).hexdigest()


def test_tarball_members_are_sorted_with_zero_times_owners_and_fixed_modes(tmp_path):
    folder, _ = make_folder(tmp_path, extra=["sub/x.txt"])
    tar_path = tmp_path / "p.tar.gz"
    pkg.make_tarball(str(folder), str(tar_path))
    raw = tar_path.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # the gzip header's mtime
    assert gzip.decompress(raw)[:4] == b"pkg/"  # one gzip member holding the tar
    with tarfile.open(tar_path, "r:gz") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == [f"pkg/{n}" for n in sorted([*REQUIRED_FILES, "sub/x.txt"])] + [f"pkg/{MANIFEST}"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        assert tar.extractfile("pkg/model.ts").read() == (folder / "model.ts").read_bytes()


def test_a_tarball_extracts_to_its_one_top_folder_and_verifies(tmp_path):
    folder, digest = make_folder(tmp_path)
    pkg.make_tarball(str(folder), str(tmp_path / "p.tar.gz"))
    out = pkg.extract_tarball(str(tmp_path / "p.tar.gz"), str(tmp_path / "out"))
    assert out == str(tmp_path / "out" / "pkg")
    assert pkg.verify_package(out, digest)["manifest_sha256"] == digest


def test_a_tarball_with_two_top_folders_is_refused(tmp_path):
    path = tmp_path / "two.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("a/x", "b/y"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(PackageError, match=r"expected one top-level package folder, found \['a', 'b'\]"):
        pkg.extract_tarball(str(path), str(tmp_path / "out"))


def test_a_file_that_is_not_gzip_is_refused_with_its_name(tmp_path):
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(PackageError, match="junk.tar.gz: not a readable .tar.gz"):
        pkg.extract_tarball(str(tmp_path / "junk.tar.gz"), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------- runtime agreement
def test_tolerance_scales_with_the_largest_logit_but_never_below_the_base():
    assert pkg.tolerance_for(np.array([[0.5, -0.25]])) == pkg.RELATIVE_TOLERANCE
    assert pkg.tolerance_for(np.array([[3.0, -40.0]])) == pytest.approx(40 * pkg.RELATIVE_TOLERANCE)
    assert pkg.tolerance_for(np.zeros((0, 3))) == pkg.RELATIVE_TOLERANCE


def test_compare_logits_counts_only_real_mismatches():
    reference = np.array([[[10.0, 0.0], [0.0, 10.0], [5.0, 5.0 - 1e-4]]])  # the last is a near tie
    tol = pkg.tolerance_for(reference)  # 1e-3
    near_tie_flipped = reference.copy()
    near_tie_flipped[0, 2] = [5.0 - 1e-4, 5.0]
    got = pkg.compare_logits(reference, near_tie_flipped)
    assert got == {"max_abs_diff": pytest.approx(1e-4), "tolerance": tol, "class_match_rate": pytest.approx(2 / 3),
                   "real_mismatches": 0, "agrees": True}
    wrong = reference.copy()
    wrong[0, 0] = [0.0, 10.0]
    got = pkg.compare_logits(reference, wrong)
    assert got["real_mismatches"] == 1 and not got["agrees"] and got["max_abs_diff"] == 10.0
    just_off = reference + np.where(np.arange(2) == 0, tol * 1.01, 0.0)
    assert not pkg.compare_logits(reference, just_off)["agrees"]  # no class changes, values beyond tolerance
    assert pkg.compare_logits(reference, reference + tol * 0.99)["agrees"]  # within the tolerance
    assert pkg.compare_logits(np.zeros((1, 0, 2)), np.zeros((1, 0, 2))) == {
        "max_abs_diff": 0.0, "tolerance": pkg.RELATIVE_TOLERANCE, "class_match_rate": 1.0, "real_mismatches": 0,
        "agrees": True}


# ------------------------------------------------------------------------- refusals, word for word
def test_a_symlink_is_refused_when_listing(tmp_path):
    folder, _ = make_folder(tmp_path)
    (folder / "link").symlink_to(folder / "model.ts")
    with pytest.raises(PackageError, match="^link: is a symbolic link; a package holds only regular files$"):
        pkg.write_manifest(str(folder))


def test_a_listed_path_through_a_linked_folder_resolves_outside(tmp_path):
    folder, _ = make_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("x")
    (folder / "sub").symlink_to(outside)
    text = (folder / MANIFEST).read_text() + f"{hashlib.sha256(b'x').hexdigest()}  sub/x.txt\n"
    (folder / MANIFEST).write_text(text)
    with pytest.raises(PackageError, match="^sub/x.txt: resolves outside the package folder$"):
        pkg.verify_package(str(folder))


def test_a_listed_file_that_is_missing_is_named(tmp_path):
    folder, _ = make_folder(tmp_path)
    (folder / "model.pt2").unlink()
    with pytest.raises(PackageError, match="^model.pt2: listed in MANIFEST.sha256 but missing from the package$"):
        pkg.verify_package(str(folder))


def test_two_unlisted_files_say_one_more(tmp_path):
    folder, _ = make_folder(tmp_path)
    (folder / "x1").write_text("1")
    (folder / "x2").write_text("2")
    with pytest.raises(PackageError, match=r"^x1: present in the package but not listed in MANIFEST.sha256 "
                                           r"\(and 1 more\)$"):
        pkg.verify_package(str(folder))


def test_a_checksum_mismatch_says_what_it_means(tmp_path):
    folder, _ = make_folder(tmp_path)
    (folder / "model.ts").write_bytes(b"other")
    with pytest.raises(PackageError, match=r"\): the file was modified or corrupted$"):
        pkg.verify_package(str(folder))


def test_a_long_malformed_manifest_line_is_quoted_up_to_120_characters(tmp_path):
    folder, _ = make_folder(tmp_path)
    line = "z" * 200
    (folder / MANIFEST).write_text(line + "\n")
    with pytest.raises(PackageError) as caught:
        pkg.verify_package(str(folder))
    assert str(caught.value) == f"MANIFEST.sha256: line 1 is not '<sha256>  <name>': {'z' * 120!r}"


def test_a_refused_member_name_says_what_is_refused():
    with pytest.raises(PackageError) as caught:
        pkg.check_member_name("../x")
    assert str(caught.value) == ("manifest entry '../x' is not a plain relative path inside the package (absolute "
                                 "paths, '..', '.', backslashes and empty segments are refused)")


def tarball_with(path, names):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = 1
                tar.addfile(info, io.BytesIO(b"1"))
    return str(path)


def test_folder_members_are_accepted_and_absolute_members_refused(tmp_path):
    out = pkg.extract_tarball(tarball_with(tmp_path / "d.tar.gz", ["pkg/", "pkg/sub/", "pkg/sub/x"]),
                              str(tmp_path / "out"))
    assert (tmp_path / "out" / "pkg" / "sub" / "x").read_bytes() == b"1" and out == str(tmp_path / "out" / "pkg")
    with pytest.raises(PackageError, match="not a plain relative path"):
        pkg.extract_tarball(tarball_with(tmp_path / "abs.tar.gz", ["/pkg/x"]), str(tmp_path / "out2"))


def test_an_uncompressed_tar_is_not_a_package_tarball(tmp_path):
    path = tmp_path / "plain.tar.gz"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("pkg/x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(PackageError, match="plain.tar.gz: not a readable .tar.gz"):
        pkg.extract_tarball(str(path), str(tmp_path / "out"))


def test_the_gzip_header_carries_no_file_name(tmp_path):
    folder, _ = make_folder(tmp_path)
    pkg.make_tarball(str(folder), str(tmp_path / "p.tar.gz"))
    assert (tmp_path / "p.tar.gz").read_bytes()[3] == 0  # FLG: no FNAME (it would be the temporary file's)


def test_a_near_tie_is_the_top_two_of_many_classes():
    tol = pkg.RELATIVE_TOLERANCE  # logits within [-1, 1]
    reference = np.array([[[0.9, 0.5, 0.5]]])  # top two: 0.9 and 0.5, a clear margin (the third does not count)
    flipped = np.array([[[0.5, 0.9, 0.5]]])
    assert pkg.compare_logits(reference, flipped)["real_mismatches"] == 1
    close = np.array([[[0.5, 0.5 + 2.5 * tol, -0.9]]])  # margin 2.5 tolerances: a real mismatch if it flips
    assert pkg.compare_logits(close, close[..., [1, 0, 2]])["real_mismatches"] == 1


def test_a_difference_of_exactly_the_tolerance_agrees():
    reference = np.zeros((1, 4, 3))
    assert pkg.compare_logits(reference, reference + pkg.RELATIVE_TOLERANCE)["agrees"]


def test_names_with_spaces_survive_manifest_verification_and_the_tarball(tmp_path):
    folder, digest = make_folder(tmp_path, extra=["notes dir/read me.txt"])
    files = pkg.verify_package(str(folder), digest)["files"]
    name = "notes dir/read me.txt"
    assert pkg.read_verified(str(folder), name, files) == (folder / name).read_bytes()
    pkg.make_tarball(str(folder), str(tmp_path / "p.tar.gz"))
    out = pkg.extract_tarball(str(tmp_path / "p.tar.gz"), str(tmp_path / "out"))
    assert pkg.verify_package(out, digest)["files"] == files


# ------------------------------------------------------------------------------ the default runtime
PT2_CHOICE = {"variant": "aot_inductor", "runtime": "pt2", "reason": "the fastest eligible variant"}
INT8_CHOICE = {"variant": "int8_pt2e", "runtime": "int8", "reason": "int8 meets every gate"}
BUILT = {"torchscript": True, "pt2": True, "int8": True}


@pytest.mark.parametrize("choice, built, why_not_int8, expected", [
    (None, BUILT, "", {"variant": "torchscript_frozen", "serve_runtime": "torchscript", "file": "model.ts",
                       "reason": "no evaluation choice: the reference TorchScript", "from_evaluation": False}),
    (PT2_CHOICE, BUILT, "", {"variant": "aot_inductor", "serve_runtime": "pt2", "file": "model.pt2",
                             "reason": "chosen by the evaluation: the fastest eligible variant",
                             "from_evaluation": True}),
    (INT8_CHOICE, BUILT, "", {"variant": "int8_pt2e", "serve_runtime": "int8", "file": "model_int8.pt2",
                              "reason": "chosen by the evaluation: int8 meets every gate", "from_evaluation": True}),
    (PT2_CHOICE, {**BUILT, "pt2": False}, "", {
        "variant": "torchscript_frozen", "serve_runtime": "torchscript", "file": "model.ts", "from_evaluation": False,
        "reason": "the evaluation chose aot_inductor, but this package's model.pt2 is not an AOTInductor program: "
                  "the reference TorchScript"}),
    (INT8_CHOICE, {**BUILT, "int8": False}, "its record does not match", {
        "variant": "torchscript_frozen", "serve_runtime": "torchscript", "file": "model.ts", "from_evaluation": False,
        "reason": "the evaluation chose int8_pt2e, but its record does not match: the reference TorchScript"}),
    ({"variant": "torchscript_frozen", "runtime": "torchscript", "reason": "nothing faster fits"}, BUILT, "", {
        "variant": "torchscript_frozen", "serve_runtime": "torchscript", "file": "model.ts", "from_evaluation": True,
        "reason": "chosen by the evaluation: nothing faster fits"}),
])
def test_the_default_runtime_is_the_evaluations_choice_when_the_package_has_it(choice, built, why_not_int8, expected):
    assert pkg.default_runtime(choice, built, why_not_int8) == expected


def test_the_evaluations_choice_is_read_from_its_metrics(tmp_path):
    from tests.serving.conftest import evaluation_metrics  # a whole metrics artifact (imports torch)

    assert pkg.evaluation_choice(None) is None and pkg.evaluation_choice(str(tmp_path)) is None  # no evaluation
    metrics = evaluation_metrics("model:seg@v1", "dataset:fleet@v1", "metrics:seg@v1")
    metrics.save_to(str(tmp_path))
    assert pkg.evaluation_choice(str(tmp_path)) is None  # evaluated before variants were chosen
    candidate = {**metrics.candidate, "variants": {"choice": PT2_CHOICE}}
    type(metrics).from_dict({**metrics.to_dict(), "candidate": candidate}, "metrics.json").save_to(str(tmp_path))
    assert pkg.evaluation_choice(str(tmp_path)) == PT2_CHOICE
