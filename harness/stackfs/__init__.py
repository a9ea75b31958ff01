"""stackfs: stackcheck's own stacking filesystem, on FUSE (pyfuse3).

    python -m harness.stackfs shift SOURCE MOUNTPOINT [--map 0:100000:65536] [--bug NAME]...
    python -m harness.stackfs union LOWER[:LOWER...] UPPER MOUNTPOINT [--bug NAME]...

shift mode passes one directory through with container ids shifted (on-disk
id N is host id 100000+N), as shiftfs and idmapped mounts do.  Bug switches
(--bug) bring back historical bugs of stacked filesystems, so that the suite
can be shown to catch them; see bugs.py.
"""
