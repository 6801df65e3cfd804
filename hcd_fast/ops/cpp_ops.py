"""C++/CUDA backends: autograd Functions over the ``torch.ops.hcd_fast`` ops (not implemented yet)."""


def status(name):
    return False, "not implemented yet (issue #4)"


def devices(name):
    return ()
