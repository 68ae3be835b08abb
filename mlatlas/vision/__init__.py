"""Detection: box operations, RoI poolings, deformable convolution, and a small two-stage
detector (Faster R-CNN and R-FCN heads) with an SPP classifier."""
