"""Vim (vim-nox): the editor with which the report did not see the bug.

`vim -u NONE -N` (no vimrc, no defaults.vim), the buffer replaced with ggdG and
typed text, :w, :q, for each 'backupcopy' value.  With 'writebackup' on (the
default) Vim makes F~ while writing and removes it afterwards: no backup is left.
'backupskip' is emptied: its default skips backups under /tmp and $TMPDIR, where
Vim then rewrites every file in place whatever 'backupcopy' says, as it would
not for the user's own files.
"""

import os

from harness.clients import Client, Run, register


@register
class Vim(Client):
    name = "vim"
    command = "vim.nox"
    package = "vim-nox"
    styles = {
        "auto": "the default backupcopy=auto: Vim chooses (for a plain file: rename F, write a new F)",
        "yes": "backupcopy=yes: copy F aside, rewrite F in place",
        "no": "backupcopy=no: rename F aside, write a new F",
    }

    in_place = ("yes",)

    def save_steps(self, name, new, style):
        text = new.decode().rstrip("\n").replace("'", "''")  # a Vim single-quoted string
        return [Run((self.command, "-u", "NONE", "-i", "NONE", "-N", "-n", "-es", "--cmd",
                     f"set backupcopy={style} backupskip=", "-c", "%d", "-c", f"call setline(1, '{text}')",
                     "-c", "wq", name))]

    def save(self, path, new, style, session):
        directory, name = os.path.split(path)
        # t_u7=: no cursor-position queries (Vim's ambiwidth and xterm probes); the pty never
        # answers them, and Vim waits 100 ms for the answer on exit.
        vim = self.spawn([self.command, "-u", "NONE", "-i", "NONE", "-N", "-n",
                          "--cmd", f"set backupcopy={style} backupskip= t_u7=", name], session, directory)
        self.wait(vim, rf'"{name}" \d+L', f"{name} loaded (its line count on the status line)")
        vim.send("ggdG")                        # the whole buffer deleted
        vim.send("i" + new.decode().rstrip("\n") + "\x1b")
        vim.send(":w\r")
        self.wait(vim, r"written", "the 'written' message of :w")
        vim.send(":q\r")
        self.finish(vim, ":q")
        return None
