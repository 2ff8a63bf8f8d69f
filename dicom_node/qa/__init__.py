"""QA gates on every sCT (DESIGN.md §8): named checks, a policy per route, the QA report and the
uncertainty map for the PACS."""
