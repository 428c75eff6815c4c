"""Exec user-mode Linux with a seccomp filter that hides PTRACE_GETREGSET(NT_X86_XSTATE) from it.

Why: UML 6.1 probes xstate support with PTRACE_GETREGSET and then restores a fixed
832-byte ``struct _xstate`` with PTRACE_SETREGSET; host kernels since 5.14 refuse a
short XSAVE buffer (EFAULT) on CPUs whose XSAVE area is larger (AVX-512), and UML
panics at its first process ("ptrace set fp regs failed, errno = 14").  When the
probe fails UML falls back to PTRACE_GETFPREGS/SETFPREGS (FXSAVE), which works.
Guest syscalls run under PTRACE_SYSEMU and never reach this filter.

Caveat: with FXSAVE only, the upper halves of YMM/ZMM registers are not switched between
threads of one guest process; GLIBC_TUNABLES in the guest keeps glibc on SSE2 code.

    python3 uml_boot.py linux.uml mem=1G ...
"""

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
NR_PTRACE = 101
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
NT_X86_XSTATE = 0x202
RET_ALLOW = 0x7FFF0000
RET_ERRNO_EIO = 0x00050000 | 5

# classic BPF: (code, jt, jf, k)
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
PROG = [
    (LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
    (JEQ_K, 0, 8, AUDIT_ARCH_X86_64),
    (LD_W_ABS, 0, 0, 0),  # nr
    (JEQ_K, 0, 6, NR_PTRACE),
    (LD_W_ABS, 0, 0, 16),  # args[0] (low 32 bits): request
    (JEQ_K, 1, 0, PTRACE_GETREGSET),
    (JEQ_K, 0, 3, PTRACE_SETREGSET),
    (LD_W_ABS, 0, 0, 32),  # args[2] (low 32 bits): NT_* type
    (JEQ_K, 0, 1, NT_X86_XSTATE),
    (RET_K, 0, 0, RET_ERRNO_EIO),
    (RET_K, 0, 0, RET_ALLOW),
]


def install() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in PROG)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Fprog(len(PROG), ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
