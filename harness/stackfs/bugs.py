"""Bug switches: each brings back one historical bug, as faithfully as FUSE allows."""

BUGS = {
    "stale-dentry": (
        "LP#1879196: shiftfs kept serving cached lookups and attributes after the underlay "
        "changed, so files replaced by rename (emacs, bzr revert) kept their old content. "
        "Here: name lookups (and names found absent) are answered from the daemon's cache, and "
        "the kernel may keep them for an hour; attributes and data stay fresh, so an edit in "
        "place (same inode) is still seen, as it was with shiftfs."),
    "renamed-lower": (
        "LP#1879196 as it stayed after its fix (shift mode only): shiftfs_d_revalidate keeps a "
        "dentry while its lower dentry is hashed and of the same sign, and a lower dentry "
        "that rename() moved to another name (F to F~, emacs' backup) is both, so F keeps "
        "reaching the file now called F~: reads, stats, writes and O_TRUNC opens, unlinks "
        "and renames. Here: a name keeps the node it was first found as while the "
        "underlying object has a link; the kernel revalidates each lookup with the daemon "
        "(no timeout), as it calls d_revalidate."),
    "estale-reopen": (
        "LP#1872757: shiftfs failed to reopen an unlinked file through /proc/<pid>/fd with "
        "ESTALE. Here: open() of an inode whose link count is 0 fails with ESTALE."),
    "unlinked-special": (
        "LP#1860041: fstat of an unlinked device node, FIFO or socket through the stack "
        "failed. Here: getattr of an unlinked non-regular, non-directory inode fails with ENOENT."),
    "sync-swallow": (
        "fsync/fdatasync return 0 although the underlay reported a writeback error."),
    "sync-repeat": (
        "once the underlay reported a writeback error for a file, every later fsync of that "
        "file fails, on every fd, instead of once per fd as errseq says."),
}


def parse(names):
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        raise ValueError(f"unknown bug switch: {', '.join(unknown)} (known: {', '.join(BUGS)})")
    return frozenset(names)
