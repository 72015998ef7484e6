"""madclip in the hospital: a DICOM node (C-STORE in, SEG + TID 1500 SR out) and the DICOMweb path.

- `results`: score one DICOM series as a volume (the same code as `madclip-infer` on a series folder) and
  build the result objects: the DICOM SEG (`madclip_runtime.scans.dicom_seg`) and a highdicom TID 1500
  measurement report carrying the volume score, decision, threshold, per-slice scores, method and bundle
  identity and the research-use statement, both referencing the source series and instances.
- `spool`: the node's durable directories (incoming instances, outbox of results, sent journal).
- `node`: `madclip-dicom-node`, the pynetdicom storage SCP, series grouping, scoring worker and sender.
- `web`: `madclip-infer --dicomweb URL --study UID [--series UID] [--stow]` (WADO-RS in, STOW-RS out).

Needs the `pacs` extra (pynetdicom, dicomweb-client) and `medical` (pydicom, highdicom). Research use, not
for clinical decisions.
"""
