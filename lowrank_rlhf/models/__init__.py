"""Models: base loading (4bit | 8bit | none), built-in models, random LLaMA shapes, and the role adapters."""

import logging


class _NoHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    bitsandbytes 0.50 logs it at import on every CPU with AVX512-BF16 when the optional `kernels` package (which
    downloads a fused kernel from the Hugging Face Hub) is absent. That kernel serves only the repacked no-grad
    inference path of Linear4bit, which `loading.keep_one_cpu_4bit_path` switches off (PPO needs one kernel for
    grad and no-grad forwards), so it would never run here and nothing is slower without it. Other bitsandbytes
    warnings pass. Installed here, before any submodule imports transformers (which imports peft, then
    bitsandbytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())
