import pytest

from dicom_node.config import load_config
from dicom_node.routing import decide

ROUTES = load_config().routes


@pytest.mark.parametrize(
    ("description", "protocol"),
    [
        ("3D Ax T1 MP-RAGE_R22", "Brain Advanced Sequences"),  # the GE series of ../shared/data
        ("ADNI_Sag3D MPRAGE", "WIP ADNI_Sag3D MPRAGE"),  # the Philips series
        ("t2_tse_tra", ""),
        ("T2 FLAIR SAG", ""),
        ("", "T1W_3D_TFE"),
        ("Ax T1 BRAVO", ""),
        ("t1_vibe_dixon_tra", ""),
    ],
)
def test_structural_t1_t2_series_are_routed(description, protocol):
    decision = decide(ROUTES, series_description=description, protocol_name=protocol, calling_aet="SCANNER")
    assert decision.routed, decision.reason
    assert decision.destinations == ("planning_pacs",)


@pytest.mark.parametrize(
    ("description", "protocol"),
    [
        ("ep2d_diff_b1000_tra", ""),
        ("DWI b0 b1000", "DWI"),
        ("T2 TRACEW", ""),  # derived diffusion trace, even though T2 is in the name
        ("ADC map", ""),
        ("localizer", ""),
        ("AAHead_Scout", ""),
        ("SURVEY", ""),
        ("ep2d_bold_rest", ""),
        ("t1_fl3d_dce", ""),
        ("perfusion DSC", ""),
        ("", ""),
        ("SWI_Images", ""),
    ],
)
def test_everything_else_is_not_routed_with_a_reason(description, protocol):
    decision = decide(ROUTES, series_description=description, protocol_name=protocol, calling_aet="SCANNER")
    assert not decision.routed
    assert decision.destinations == ()
    assert decision.reason.startswith("no route matches: structural-t1-t2:")


def test_first_matching_route_wins_and_calling_aet_is_matched(tmp_path):
    import dataclasses
    import re

    research = dataclasses.replace(
        ROUTES[0], name="research", calling_aet_pattern=re.compile("RESEARCH_MR"), destinations=("archive",)
    )
    routes = (research, ROUTES[0])
    decision = decide(routes, series_description="T1 MPRAGE", protocol_name="", calling_aet="RESEARCH_MR")
    assert decision.route_name == "research"
    decision = decide(routes, series_description="T1 MPRAGE", protocol_name="", calling_aet="CLINICAL_MR")
    assert decision.route_name == "structural-t1-t2"
    decision = decide((research,), series_description="T1 MPRAGE", protocol_name="", calling_aet="RESEARCH_MR2")
    assert not decision.routed and "calling AE title 'RESEARCH_MR2' does not match" in decision.reason
