"""Reading SASS (``cuobjdump -sass`` output): instructions, loops, and instruction counts by class.

A loop is found from the control flow alone: a branch (``BRA``, predicated or not) whose target lies at or
before it closes a loop whose body is the instructions from the target to the branch. Each SASS instruction
is issued once per warp, so the number of instructions in a loop body is what one warp issues per iteration
(exactly, when the body has no branch of its own; an upper bound otherwise: ``inner_branches`` says so).

The main loop of a kernel is the largest loop that contains tensor-core instructions when there is one (an
attention kernel's loop over key or query blocks), otherwise the largest loop (a row loop); a kernel without
any loop (one program per row) is counted whole, and ``main_loop`` is then None.
"""
import re
from collections import Counter

# "/*0a40*/   @!P0 BRA 0x1230 ;" -> address, predicate, mnemonic, operands
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")

CLASSES = ("mma", "int", "float", "memory", "local", "uniform", "other")
_MMA = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "DMMA", "WARPGROUP"}
_LOCAL = {"LDL", "STL"}
_MEMORY = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDGDEPBAR", "ATOM", "ATOMS", "ATOMG", "RED",
           "LD", "ST", "LDC", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "SYNCS", "CCTL", "MEMBAR", "FENCE"}
_FLOAT = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK", "FRND", "F2F", "F2I", "F2FP", "I2F",
          "I2FP", "MUFU", "HADD2", "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "HSET2", "DADD", "DMUL", "DFMA", "DSETP",
          "FSWZADD", "F2IP"}
_INT = {"IMAD", "IADD3", "IADD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "VIMNMX", "LEA",
        "IABS", "POPC", "FLO", "BREV", "BMSK", "PRMT", "SGXT", "IDP", "I2I", "VABSDIFF", "VABSDIFF4", "SEL",
        "ISCADD", "BFE", "BFI", "IDE", "VIADD", "VIADDMNMX", "IMNMX3"}


def opcode_class(mnemonic):
    """One of CLASSES for a mnemonic such as ``LDG.E.128`` (judged by its base, ``LDG``)."""
    base = mnemonic.split(".", 1)[0]
    if base in _MMA:
        return "mma"
    if base in _LOCAL:
        return "local"
    if base in _MEMORY:
        return "memory"
    if base in _FLOAT:
        return "float"
    if base in _INT:
        return "int"
    if base.startswith("U") and base not in ("UTMALDG", "UTMASTG", "UBLKCP"):
        return "uniform"  # the uniform datapath: per-warp scalars, off the vector pipes
    return "other"


def parse(text):
    """[(address, predicate, mnemonic, operands)] of the first function in ``cuobjdump -sass`` text."""
    instrs = []
    for line in text.splitlines():
        if "Function :" in line and instrs:
            break  # one kernel per cubin; stop at a second function all the same
        m = _LINE.match(line)
        if m:
            instrs.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return instrs


def _branch_target(mnemonic, operands):
    if mnemonic.split(".", 1)[0] != "BRA":
        return None
    m = re.search(r"0x([0-9a-f]+)", operands)
    return int(m.group(1), 16) if m else None


def loops(instrs):
    """[(first index, last index)] of every loop (a backward branch and what it jumps back over), by start."""
    index = {addr: i for i, (addr, *_rest) in enumerate(instrs)}
    found = []
    for i, (addr, _pred, mnemonic, operands) in enumerate(instrs):
        target = _branch_target(mnemonic, operands)
        if target is not None and target < addr and target in index:  # a self-branch (BRA .) is a trap
            found.append((index[target], i))
    return sorted(set(found))


def count(instrs):
    """(class counts, mnemonic counts) of a list of instructions."""
    classes = Counter({c: 0 for c in CLASSES})
    mnemonics = Counter()
    for _addr, _pred, mnemonic, _ops in instrs:
        classes[opcode_class(mnemonic)] += 1
        mnemonics[mnemonic] += 1
    return classes, mnemonics


def _summary(body):
    classes, mnemonics = count(body)
    branches = sum(1 for _a, _p, m, _o in body[:-1] if m.split(".", 1)[0] in ("BRA", "BRX", "JMP"))
    return {"instructions": len(body), "classes": dict(classes), "inner_branches": branches,
            "opcodes": dict(sorted(mnemonics.items(), key=lambda kv: (-kv[1], kv[0])))}


def analyse(text):
    """Totals of the whole kernel, every loop (size and classes), and the main loop's full breakdown."""
    instrs = parse(text)
    if not instrs:
        raise ValueError("no SASS instructions found in the disassembly")
    found = loops(instrs)
    loop_rows = []
    for first, last in found:
        body = instrs[first:last + 1]
        classes, _ = count(body)
        loop_rows.append({"start": f"0x{instrs[first][0]:x}", "end": f"0x{instrs[last][0]:x}",
                          "instructions": len(body), "classes": dict(classes)})
    main = None
    if loop_rows:
        with_mma = [i for i, r in enumerate(loop_rows) if r["classes"]["mma"] > 0]
        pool = with_mma or range(len(loop_rows))
        best = max(pool, key=lambda i: (loop_rows[i]["instructions"], -i))
        first, last = found[best]
        main = dict(_summary(instrs[first:last + 1]), start=loop_rows[best]["start"], end=loop_rows[best]["end"])
    whole = _summary(instrs)
    # What one warp issues per unit of work: an iteration of the main loop, or the whole (loop-free) kernel.
    per_unit = main if main is not None else whole
    spill_stores = sum(1 for _a, _p, m, _o in instrs if m.split(".", 1)[0] == "STL")
    spill_loads = sum(1 for _a, _p, m, _o in instrs if m.split(".", 1)[0] == "LDL")
    return {"total_instructions": len(instrs), "spill_stores": spill_stores, "spill_loads": spill_loads,
            "loops": loop_rows, "main_loop": main,
            "counted": "main loop" if main is not None else "whole kernel",
            "instructions": per_unit["instructions"], "classes": per_unit["classes"],
            "opcodes": per_unit["opcodes"], "inner_branches": per_unit["inner_branches"]}
