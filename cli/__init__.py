"""The ``logd`` command line (installed as the ``logd_trio_cli`` package)."""
