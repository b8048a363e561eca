"""Runs a command with Intel AMX withheld: a stand-in, on an AMX Intel, for a CPU that has AVX-512 BF16
but no AMX (AMD Zen 4).

    python experiments/bench/without_amx.py -- python experiments/bench/speed.py --random_weights

Linux lets a process use AMX's tile registers only after it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`); the matmul libraries XLA:CPU calls (YNNPACK, XNNPACK, oneDNN) ask at start-up and
do without AMX when refused. This installs a seccomp filter that refuses that one
request with EPERM and lets every other system call through, then replaces itself with the command; the
filter stays with it and its children. `precision.amx_permitted` then says False, and "auto" picks
float32. Linux x86-64 only; needs no privilege (no_new_privs is set first).

It is not a Zen 4: CPUID still reports AMX to XLA and its libraries. Measured on the 2-core AMX Xeon
(`experiments/bench/speed.py --matmul_size=2048`, 2 threads): a 2048^2 matmul at 261 GFLOP/s in float32
and 1,119-1,322 in bfloat16 with the tiles; with them withheld, 258 and 204, and decoder training in
bfloat16 at 0.92x float32. A Zen 4 may take another path (a user measured bfloat16 at 2.1x float32 on
such a matmul there): measure on one.
"""

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH_X86_64, NR_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM = 0xC000003E, 158, 0x1023
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | 1
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
# Offsets in struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6].
NR, ARCH, ARG0 = 0, 4, 16


def _instruction(code, jt, jf, k):
  return struct.pack("HBBI", code, jt, jf, k)


# arch == x86-64 and nr == arch_prctl and (low half of) args[0] == ARCH_REQ_XCOMP_PERM -> EPERM, else allow.
PROGRAM = b"".join([
    _instruction(LD_W_ABS, 0, 0, ARCH),
    _instruction(JEQ_K, 0, 4, AUDIT_ARCH_X86_64),
    _instruction(LD_W_ABS, 0, 0, NR),
    _instruction(JEQ_K, 0, 2, NR_ARCH_PRCTL),
    _instruction(LD_W_ABS, 0, 0, ARG0),
    _instruction(JEQ_K, 1, 0, ARCH_REQ_XCOMP_PERM),
    _instruction(RET_K, 0, 0, RET_ALLOW),
    _instruction(RET_K, 0, 0, RET_EPERM),
])


def withhold_amx():
  """Installs the filter in this process (and what it runs next)."""
  if sys.platform != "linux" or platform.machine() != "x86_64":
    raise SystemExit("without_amx: Linux on x86-64 only")
  libc = ctypes.CDLL(None, use_errno=True)
  program = ctypes.create_string_buffer(PROGRAM)
  # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
  fprog = struct.pack("HxxxxxxP", len(PROGRAM) // 8, ctypes.addressof(program))
  buffer = ctypes.create_string_buffer(fprog)
  for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, buffer, 0, 0)):
    if libc.prctl(*(ctypes.c_ulong(a) if isinstance(a, int) else a for a in args)) != 0:
      raise SystemExit(f"without_amx: prctl{args[:2]} failed: {os.strerror(ctypes.get_errno())}")


def main(argv):
  command = argv[1:]
  if command[:1] == ["--"]:
    command = command[1:]
  if not command:
    raise SystemExit(__doc__)
  withhold_amx()
  os.execvp(command[0], command)


if __name__ == "__main__":
  main(sys.argv)
