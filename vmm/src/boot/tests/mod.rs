mod acpi_tests;
mod kvm_tests;
mod loader_tests;
mod page_table_tests;
mod register_tests;
mod support;
