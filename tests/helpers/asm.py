"""The machine code of a compiled module, as tests inspect it (ground truth for the IR-based
kernel report of ``tvm_lower``): printing the assembly re-runs LLVM's code generation, seconds
per module, so the product reads the IR and the tests check it against this."""


def asm_functions(asm: str) -> dict:
    """Split x86 assembly text into {function symbol: body text}.

    Functions are the ``.type X,@function`` labels; TVM's outlined ``.L__tvm_parallel_lambda``
    bodies follow their parent function and are appended to it."""
    fn_names = set()
    for line in asm.splitlines():
        s = line.strip()
        if s.startswith(".type") and "@function" in s:
            fn_names.add(s[len(".type"):].split(",")[0].strip())
    out, name, buf = {}, None, []
    for line in asm.splitlines():
        label = line[:-1] if line and not line[0].isspace() and line.endswith(":") else None
        if label in fn_names and not label.startswith(".L"):
            if name:
                out[name] = "\n".join(buf)
            name, buf = label, []
        elif name:
            buf.append(line)
    if name:
        out[name] = "\n".join(buf)
    return out


def kernel_asm(fns: dict, sym: str) -> str:
    """The assembly of PrimFunc ``sym``: its packed wrapper and its compute body."""
    return "\n".join(fns.get(k, "") for k in (sym, f"{sym}_compute_", f"__tvm_ffi_{sym}"))
