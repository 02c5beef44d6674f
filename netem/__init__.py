"""Link and wireless-channel emulation shared by the virtual and wall clocks."""
