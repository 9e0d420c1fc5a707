"""Entry points into other training frameworks (layer 7).

Each module adapts finegrain's registries to one framework and imports that framework lazily, so
``import finegrain.integrations.<name>`` works without it installed:

    verl   finegrain's advantage estimators, policy losses and reward signals inside verl 0.9.1
           (docs/verl.md)
"""
