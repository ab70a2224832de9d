"""Model patchers (apply and revert): ``mmfast.patch.timm`` for timm models; token merging lives
in ``mmfast.tome``."""
