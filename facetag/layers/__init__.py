"""facetag.layers: every op with a hand-written backward pass.

One file per op family; each op ``Foo`` is ``FooFn`` (the autograd Function), ``foo()``
(the validating wrapper) and ``Foo`` (the nn.Module). Exports are collected here once all
families exist.
"""
