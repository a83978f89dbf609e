"""Source adapters: iSAID, COCO, imagery of any size, label files, SAM masks, georeferencing."""
