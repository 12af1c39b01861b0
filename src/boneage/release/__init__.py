"""From a trained run to the shipped model: ship rules decided on the validation split (``ship``), the
model file with its measured facts (``bundle``), weight averages (``average``) and the release records
(``records``). Needs the training stack."""
