"""--module SRC: modules built from source for Debian's 6.1 kernel (harness/modules.py).

Real builds with the host's gcc against Debian's headers of the image's exact
version: a small DKMS tree of our own (tests/module_tree.py), plain Kbuild
directories, and overlayfs from Debian's linux-source of that version, with and
without a patch of ours.  The headers, the source package and its extracted
subtree stay in stackcheck's cache; the builds of each test go to its own
scratch, so every run really builds.
"""

import difflib
import os
import shutil

import pytest

from harness import modules, vm
from module_tree import DESCRIPTION, NAME, write_dkms_tree, write_kbuild_tree

# Adds a .modinfo entry to overlay.ko: a visible effect, and a new srcversion.
OVERLAY_PATCH = """\
--- a/fs/overlayfs/super.c
+++ b/fs/overlayfs/super.c
@@ -21,6 +21,7 @@
 MODULE_AUTHOR("Miklos Szeredi <miklos@szeredi.hu>");
 MODULE_DESCRIPTION("Overlay filesystem");
 MODULE_LICENSE("GPL");
+MODULE_INFO(stackcheck, "patched");
 
 
 struct ovl_dir_cache;
"""
# The same change against context that is not there.
STALE_PATCH = OVERLAY_PATCH.replace('MODULE_LICENSE("GPL");', 'MODULE_LICENSE("GPL v2");')
C_FILE = f"{NAME}.c"


@pytest.fixture(scope="module")
def kernel():
    """Debian's 6.1 kernel, found as ./check --kernel linux-image-amd64 finds it."""
    found = vm.resolve_kernel("linux-image-amd64")
    assert found.version, "the image came as a package: its Debian version is known"
    return found


@pytest.fixture(autouse=True)
def builds(tmp_path, monkeypatch):
    """This test's builds in its scratch: each run builds for real, and leaves no builds behind."""
    monkeypatch.setattr(modules, "BUILDS", str(tmp_path / "builds"))


@pytest.fixture
def log(tmp_path):
    return str(tmp_path / "build.log")


@pytest.fixture
def tree(tmp_path):
    """Our DKMS tree, fresh in this test's scratch."""
    return write_dkms_tree(tmp_path / NAME)


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def edit(path, old, new):
    text = read(path)
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


def one_line(error):
    message = str(error.value)
    assert "\n" not in message and message
    return message


# -- parse: checked before anything is built ----------------------------------------------------------
def test_parse_knows_a_dkms_tree_a_kbuild_dir_and_linux_source(tree, tmp_path):
    assert modules.parse(tree) == modules.ModuleSource(tree, "dkms", tree)
    assert modules.parse(write_kbuild_tree(tmp_path / "kbuild")).kind == "kbuild"
    patch = tmp_path / "fix.patch"
    patch.write_text(OVERLAY_PATCH)
    source = modules.parse(f"linux-source:fs/overlayfs/+{patch}")
    assert (source.kind, source.path, source.patches) == ("linux-source", "fs/overlayfs", (str(patch),))


def test_parse_refuses_a_missing_directory(tmp_path):
    with pytest.raises(modules.ModuleError) as error:
        modules.parse(str(tmp_path / "nowhere"))
    assert one_line(error) == f"--module {tmp_path}/nowhere: no such directory: {tmp_path}/nowhere"


def test_parse_refuses_a_directory_that_is_no_module_tree(tmp_path):
    (tmp_path / "Makefile").write_text("all:\n\techo hello\n")
    with pytest.raises(modules.ModuleError) as error:
        modules.parse(str(tmp_path))
    assert "is not a module source tree (no dkms.conf, no Kbuild, no Makefile with obj-m)" in one_line(error)


def test_parse_refuses_a_missing_or_unreadable_patch(tree, tmp_path):
    with pytest.raises(modules.ModuleError) as error:
        modules.parse(f"{tree}+{tmp_path}/fix.patch")
    assert one_line(error).endswith("patch " + f"{tmp_path}/fix.patch: No such file or directory")
    with pytest.raises(modules.ModuleError) as error:
        modules.parse(f"linux-source:fs/overlayfs+{tmp_path}")
    assert "Is a directory" in one_line(error)
    (tmp_path / "notes.txt").write_text("not a diff\n")
    with pytest.raises(modules.ModuleError) as error:
        modules.parse(f"linux-source:fs/overlayfs+{tmp_path}/notes.txt")
    assert "notes.txt is not a patch" in one_line(error)


def test_parse_refuses_a_patch_outside_the_rebuilt_subtree(tmp_path):
    patch = tmp_path / "fs.patch"
    patch.write_text(OVERLAY_PATCH.replace("fs/overlayfs/super.c", "include/linux/fs.h"))
    with pytest.raises(modules.ModuleError) as error:
        modules.parse(f"linux-source:fs/overlayfs+{patch}")
    assert "fs.patch patches include/linux/fs.h, outside fs/overlayfs" in one_line(error)
    for bad in ("linux-source:", "linux-source:/fs/overlayfs", "linux-source:../fs"):
        with pytest.raises(modules.ModuleError):
            modules.parse(bad)


# -- a DKMS tree -----------------------------------------------------------------------------------------
def test_a_dkms_tree_builds_for_debians_kernel_and_a_second_build_is_cached(kernel, log, tree):
    release, version = kernel.release, kernel.version
    source = modules.parse(tree)
    (built,) = modules.build(source, release, version, log)
    assert built.name == NAME and built.release == release
    assert built.source == f"{tree} (dkms {NAME})"
    info = modules.modinfo(built.path)
    assert info["name"] == NAME and info["vermagic"].startswith(release + " ")
    assert info["description"] == DESCRIPTION
    assert info["srcversion"] == built.srcversion and len(built.srcversion) == 23
    assert (built.vermagic, built.depends) == (info["vermagic"], ())
    assert "make -j" in read(log)
    mtime = os.stat(built.path).st_mtime_ns

    again = modules.build(source, release, version, log)
    assert again == [built] and os.stat(built.path).st_mtime_ns == mtime
    second = read(log).rsplit(f"--module {tree} for kernel", 1)[1]
    assert "cached:" in second and "$ " not in second  # no command ran: no make


def test_a_changed_source_byte_rebuilds(kernel, log, tree, tmp_path):
    release, version = kernel.release, kernel.version
    (original,) = modules.build(modules.parse(tree), release, version, log)
    copy_tree = str(shutil.copytree(tree, tmp_path / "elsewhere"))
    (copy,) = modules.build(modules.parse(copy_tree), release, version, log)
    assert copy.source_hash == original.source_hash  # the content is the key, not the place
    assert copy.path == original.path
    assert copy.source == f"{copy_tree} (dkms {NAME})"  # but the results name the place it came from

    edit(os.path.join(copy_tree, C_FILE), DESCRIPTION, DESCRIPTION.capitalize())
    (changed,) = modules.build(modules.parse(copy_tree), release, version, log)
    assert changed.source_hash != original.source_hash and changed.path != original.path
    assert modules.modinfo(changed.path)["description"] == DESCRIPTION.capitalize()
    assert changed.srcversion != original.srcversion
    assert read(log).rsplit("--module", 1)[1].count("make -j") == 1


def test_a_broken_source_is_one_line_naming_module_and_kernel_and_the_log_has_why(kernel, log, tree):
    release, version = kernel.release, kernel.version
    c_file = os.path.join(tree, C_FILE)
    broken_line = read(c_file).count("\n") + 2  # after an empty line
    with open(c_file, "a") as f:
        f.write("\nint stackcheck_broken = ;\n")
    with pytest.raises(modules.ModuleError) as error:
        modules.build(modules.parse(tree), release, version, log)
    message = one_line(error)
    assert message.startswith(f"--module {tree}: building for kernel {release} failed (see {log}): ")
    assert message.endswith(f"): {C_FILE}:{broken_line}:25: error: expected expression before ';' token")
    assert "error: expected expression before ';' token" in read(log)
    assert not os.listdir(modules.BUILDS)  # no half-built entry left in the cache


def test_dkms_build_exclusive_kernel_refuses_another_release(kernel, log, tree):
    release, version = kernel.release, kernel.version
    edit(os.path.join(tree, "dkms.conf"), 'BUILD_EXCLUSIVE_KERNEL="^6\\."', 'BUILD_EXCLUSIVE_KERNEL="^5\\."')
    with pytest.raises(modules.ModuleError) as error:
        modules.build(modules.parse(tree), release, version, log)
    assert one_line(error) == (f"--module {tree}: {NAME} does not build for kernel {release} "
                               '(dkms.conf BUILD_EXCLUSIVE_KERNEL="^5\\.")')


def test_a_dkms_tree_takes_patches_too(kernel, log, tree, tmp_path):
    release, version = kernel.release, kernel.version
    original = read(os.path.join(tree, C_FILE))
    patched = original.replace(DESCRIPTION, DESCRIPTION + ", patched")
    patch = tmp_path / "describe.patch"
    patch.write_text("".join(difflib.unified_diff(original.splitlines(True), patched.splitlines(True),
                                                  f"a/{C_FILE}", f"b/{C_FILE}")))
    (built,) = modules.build(modules.parse(f"{tree}+{patch}"), release, version, log)
    assert modules.modinfo(built.path)["description"] == DESCRIPTION + ", patched"
    assert built.source == f"{tree} (dkms {NAME}) + describe.patch"


def test_dkms_variables_and_layout_are_dkms_own(kernel, log, tmp_path):
    """MAKE naming $dkms_tree/$PACKAGE_NAME/$PACKAGE_VERSION/build, a module in a
    BUILT_MODULE_LOCATION, and kernelver/KVERSION/KDIR in the make's environment."""
    release, version = kernel.release, kernel.version
    tree = tmp_path / "hello-dkms"
    (tree / "src").mkdir(parents=True)
    (tree / "dkms.conf").write_text(
        'PACKAGE_NAME="hello"\nPACKAGE_VERSION="1.0"\n'
        'MAKE[0]="make -C ${kernel_source_dir} M=${dkms_tree}/${PACKAGE_NAME}/${PACKAGE_VERSION}/build/src"\n'
        'BUILT_MODULE_NAME[0]="stackcheck_hello"\nBUILT_MODULE_LOCATION[0]="src"\n'
        'DEST_MODULE_LOCATION[0]="/extra"\n')
    (tree / "src" / "Kbuild").write_text(
        "obj-m := stackcheck_hello.o\n"
        'ccflags-y := -DFROM_ENV=\'"$(kernelver) $(KVERSION) $(KDIR)"\'\n')
    (tree / "src" / "stackcheck_hello.c").write_text(
        '#include <linux/module.h>\nMODULE_LICENSE("GPL");\nMODULE_INFO(stackcheck, FROM_ENV);\n')
    (built,) = modules.build(modules.parse(str(tree)), release, version, log)
    assert built.path.endswith("/dkms/hello/1.0/build/src/stackcheck_hello.ko")
    with open(os.devnull, "w") as quiet:
        kdir = modules.headers(release, version, quiet)
    assert modules.modinfo(built.path)["stackcheck"] == f"{release} {release} {kdir}"
    assert built.source == f"{tree} (dkms hello)"


def test_the_running_kernel_builds_against_its_own_headers_or_says_they_are_missing(log, tmp_path):
    release = os.uname().release
    source = modules.parse(write_kbuild_tree(tmp_path / "hello"))
    if os.path.isfile(f"/lib/modules/{release}/build/Makefile"):
        (built,) = modules.build(source, release, None, log)
        assert built.vermagic.startswith(release + " ")
        return
    with pytest.raises(modules.ModuleError) as error:
        modules.build(source, release, None, log)
    assert one_line(error).startswith(f"--module {tmp_path}/hello: no kernel headers for {release}: ")
    assert one_line(error).endswith(f" and /lib/modules/{release}/build is missing")


def test_a_plain_kbuild_directory_builds(kernel, log, tmp_path):
    release, version = kernel.release, kernel.version
    (built,) = modules.build(modules.parse(write_kbuild_tree(tmp_path / "hello")), release, version, log)
    assert built.name == NAME and built.source == f"{tmp_path}/hello (kbuild)"
    assert modules.modinfo(built.path)["description"] == DESCRIPTION
    assert f"M={modules.BUILDS}" in read(log) and " modules\n" in read(log)


# -- overlayfs from Debian's own source ---------------------------------------------------------------------
def test_overlayfs_from_linux_source_with_a_patch(kernel, log, tmp_path):
    release, version = kernel.release, kernel.version
    series = ".".join(version.split(".")[:2])
    (stock,) = modules.build(modules.parse("linux-source:fs/overlayfs"), release, version, log)
    assert stock.name == "overlay" and stock.vermagic.startswith(release + " ")
    assert stock.source == f"linux-source-{series} {version}: fs/overlayfs"
    assert "stackcheck" not in modules.modinfo(stock.path)

    patch = tmp_path / "mark.patch"
    patch.write_text(OVERLAY_PATCH)
    (patched,) = modules.build(modules.parse(f"linux-source:fs/overlayfs+{patch}"), release, version, log)
    assert patched.name == "overlay" and modules.modinfo(patched.path)["stackcheck"] == "patched"
    assert patched.srcversion and patched.srcversion != stock.srcversion
    assert patched.source == f"linux-source-{series} {version}: fs/overlayfs + mark.patch"
    assert patched.patches == (("mark.patch", modules._file_sha256(str(patch))),)


def test_a_patch_that_does_not_apply_is_one_line_naming_it(kernel, log, tmp_path):
    release, version = kernel.release, kernel.version
    patch = tmp_path / "stale.patch"
    patch.write_text(STALE_PATCH)
    with pytest.raises(modules.ModuleError) as error:
        modules.build(modules.parse(f"linux-source:fs/overlayfs+{patch}"), release, version, log)
    assert one_line(error) == (f"--module linux-source:fs/overlayfs+{patch}: stale.patch does not apply to "
                               f"linux-source-{'.'.join(version.split('.')[:2])} {version}: "
                               "fs/overlayfs/super.c: Hunk #1 FAILED at 21")
    assert "make" not in read(log).rsplit("stale.patch", 1)[1]


def test_modinfo_reads_a_stock_module_of_the_image(kernel):
    info = modules.modinfo(os.path.join(kernel.modules_dir, "kernel", "fs", "overlayfs", "overlay.ko"))
    assert info["name"] == "overlay" and info["vermagic"].startswith(kernel.release + " ")
    assert info["alias"] == "fs-overlay"  # once: a string
    assert "metacopy:Default to on or off for the metadata only copy up feature" in info["parm"]  # many
