"""File I/O: checkpoint readers, the planned-layout writer and HF folder files. No merge math here."""
