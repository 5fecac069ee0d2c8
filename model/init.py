"""Layers that initialise themselves in their own constructor.

Every parameter of the model gets its initial value inside the constructor of the module that
owns it, never from a parent afterwards. That is what lets the model be built under DeepSpeed's
`zero.Init` (train/ builds the 15B model that way): it partitions each module's parameters across
ranks the moment that module's constructor returns, so a parent touching its children's weights
later would find empty placeholders. `reset_parameters()` re-applies the same initialisation.
"""

from torch import nn


class Linear(nn.Linear):
    """nn.Linear with a named initialisation: weight "xavier" (uniform), "zeros", or a float
    (normal with that std); the bias, if any, set to `bias_value`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight: str | float = "xavier", bias_value: float = 0.0):
        # Set before nn.Linear's constructor, which calls reset_parameters.
        self.weight_init, self.bias_value = weight, bias_value
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        if self.weight_init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        elif self.weight_init == "zeros":
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=float(self.weight_init))
        if self.bias is not None:
            nn.init.constant_(self.bias, self.bias_value)


class Embedding(nn.Embedding):
    """nn.Embedding initialised as N(0, 0.02^2) (GPT-2), not N(0, 1)."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)
