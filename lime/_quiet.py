"""Library notices that say nothing to a LiME user, silenced at their source (imported first by lime/__init__)."""

import logging


class _NoKernelsNotice(logging.Filter):
    """bitsandbytes (imported by peft and transformers whenever it is installed) logs on import that its optional
    CPU 4-bit kernels (the `kernels` package) are missing. LiME uses no 4-bit layers, and the line would open the
    output of every command; the logger's other messages still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsNotice())
