"""training: data, training and evaluation of the sCT model (SynthRAD layout, phantoms)."""
