from __future__ import annotations

from collections.abc import Iterator

import pytest

from dicom_node.peers import Orthanc
from tests.integration.harness import require_binary


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def orthanc(tmp_path) -> Iterator[Orthanc]:
    require_binary("Orthanc", "orthanc")
    with Orthanc(tmp_path / "orthanc") as pacs:
        yield pacs
