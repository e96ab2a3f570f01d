"""``make test`` runs each module (or the modules sharing one of ``SHARED_RUNS``) whole on one test process, so its
module and session runs are made once: pytest-xdist's ``--dist loadgroup`` learns an item's group from its node id."""

from __future__ import annotations

import pytest


def test_this_module_is_scheduled_as_one_group(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not a pytest-xdist test process under --dist loadgroup (`make test` runs it as one)")
    assert request.node.nodeid.endswith("@tests.test_xdist_groups"), request.node.nodeid
